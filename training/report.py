"""Quality figures of a trained checkpoint on its held-out test splits.

    python training/report.py src/dsexport/assets/deepseek-tiny [--windows 24] [--json]

Prints parameters (total, read per token), test-split perplexity of each corpus against a
unigram baseline (token frequencies of the same tokenizer on the training split, add-one
smoothed), per-layer expert load on the test split (share of routed assignments: max / mean
and coefficient of variation), and MTP second-token acceptance: at positions where the main
model's greedy token is the true next token, how often the MTP module's top-1 for the token
after it equals the main model's top-1 there (exactly what speculative decoding accepts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.core.config import parameter_counts
from dsexport.exporter.mtp import MTPModule
from dsexport.exporter.reference import MoE, DeepseekReference, route


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    step = max(length, (len(ids) - length) // max(1, count))
    return [ids[i:i + length] for i in range(0, len(ids) - length, step)][:count]


@torch.no_grad()
def evaluate(model: DeepseekReference, mtp: MTPModule | None, tokens: list[list[int]]) -> dict:
    nll, n = 0.0, 0
    accepted, eligible = 0, 0
    loads: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoE):
            def hook(module, inputs, output, i=i):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                _, idx = route(x @ module.router.T, module.bias, module.cfg, module.groups)
                loads[i] = loads.get(i, 0) + torch.bincount(idx.flatten(), minlength=module.router.shape[0])
            hooks.append(layer.mlp.register_forward_hook(hook))
    for seq in tokens:
        ids = torch.tensor([seq])
        logits, hidden = model(ids, return_hidden=True)
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        n += len(seq) - 1
        if mtp is not None:
            draft = mtp.predict(model, hidden[:, :-1], ids[:, 1:])[0].argmax(-1)  # predicts token t+2
            greedy = logits[0].argmax(-1)  # greedy[t] predicts token t+1
            ok = greedy[:-2] == ids[0, 1:-1]  # main model's greedy t+1 is the true t+1: same context
            accepted += int((draft[:-1][ok] == greedy[1:-1][ok]).sum())
            eligible += int(ok.sum())
    for h in hooks:
        h.remove()
    load_stats = {}
    for i, counts in loads.items():
        share = counts.double() / counts.sum()
        load_stats[i] = {"max_over_mean": float(share.max() / share.mean()), "cv": float(share.std() / share.mean()),
                         "min_share": float(share.min()), "max_share": float(share.max())}
    return {"perplexity": math.exp(nll / n), "tokens": n, "expert_load": load_stats,
            "mtp_acceptance": accepted / eligible if eligible else None, "mtp_positions": eligible}


def unigram_perplexity(train_ids: np.ndarray, test: list[list[int]], vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([np.asarray(s[1:]) for s in test])
    return float(np.exp(-logp[targets].mean()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from tokenizers import Tokenizer

    reader = CheckpointReader(args.checkpoint)
    cfg = reader.config
    model = DeepseekReference.from_checkpoint(reader)
    mtp = MTPModule.from_checkpoint(reader)
    tok = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    total, active = parameter_counts(cfg)
    mtp_params = sum(p.numel() for p in mtp.parameters()) if mtp is not None else 0
    report = {"parameters": total, "active_parameters_per_token": active, "mtp_parameters": mtp_params, "corpora": {}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data import DOC_SEPARATOR, write_corpora

    corpora = write_corpora(args.checkpoint.parent / (args.checkpoint.name + ".work") / "data")
    for name in ("english", "code"):
        test_ids = tok.encode((args.checkpoint / f"test.{name}.txt").read_text().replace(DOC_SEPARATOR, "\n")).ids
        train_ids = np.asarray(tok.encode(corpora[f"{name}.train"].read_text()).ids)
        test = windows(test_ids, args.length, args.windows)
        result = evaluate(model, mtp, test)
        result["unigram_perplexity"] = unigram_perplexity(train_ids, test, cfg.vocab_size)
        report["corpora"][name] = result
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"parameters: {total / 1e6:.2f}M total (+{mtp_params / 1e6:.2f}M MTP), {active / 1e6:.2f}M read per token")
    for name, r in report["corpora"].items():
        print(f"{name}: perplexity {r['perplexity']:.2f} vs unigram {r['unigram_perplexity']:.1f} on {r['tokens']} "
              f"test tokens; MTP acceptance {r['mtp_acceptance']:.3f} over {r['mtp_positions']} positions")
        for layer, s in r["expert_load"].items():
            print(f"  layer {layer}: expert share max/mean {s['max_over_mean']:.2f}, cv {s['cv']:.2f}, "
                  f"min {s['min_share']:.3f}, max {s['max_share']:.3f}")


if __name__ == "__main__":
    main()
