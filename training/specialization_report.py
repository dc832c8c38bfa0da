"""How specialized a checkpoint's routed experts are: the perplexity cost of pruning them.

    OMP_NUM_THREADS=1 python training/specialization_report.py /work/specialized/model \\
        [--windows 24] [--samples 256] [--fractions 0.25 0.5] [--json out.json]

With the project's own tools: fp32 perplexity of the reference model on the checkpoint's
held-out test text (test.{english,code}.txt, windows as training/report.py takes them), against
the unigram baseline; routing calibrated (dsexport.calibration.run.calibrate) on each training
corpus and on both; pruning planned (dsexport.calibration.pruning.plan_pruning, global scope) for
each fraction and criterion; perplexity of the reference model with only the kept experts
(ModelConfig.with_kept_experts, what a pruned bundle holds). Prints the perplexity change vs
fp32 per (calibration, fraction, criterion, evaluated corpus), the in-domain average (calibrated
and evaluated on the same corpus), and each MoE layer's expert load imbalance (max / mean tokens
per expert) in each calibration profile and on the test text.

The training corpora are those the embedded model was trained on (training/data.py output,
cached in src/dsexport/assets/deepseek-tiny.work/data); pass --corpora for another copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import DOC_SEPARATOR  # noqa: E402
from report import evaluate, unigram_perplexity, windows  # noqa: E402

from dsexport.calibration.pruning import CRITERIA, PruneConfig, plan_pruning  # noqa: E402
from dsexport.calibration.run import calibrate  # noqa: E402
from dsexport.core.config import load_config, parameter_counts  # noqa: E402
from dsexport.exporter.checkpoint import CheckpointReader  # noqa: E402
from dsexport.exporter.reference import DeepseekReference  # noqa: E402

DOMAINS = ("english", "code")
DEFAULT_CORPORA = HERE.parent / "src" / "dsexport" / "assets" / "deepseek-tiny.work" / "data"


def load_imbalance(selected) -> dict:
    sel = np.asarray(selected, float)
    share = sel / max(sel.sum(), 1.0)
    return {"max_over_mean": float(sel.max() / max(sel.mean(), 1e-12)), "cv": float(share.std() / share.mean()),
            "min_share": float(share.min()), "max_share": float(share.max()), "never": int((sel == 0).sum())}


def removed_share(profile, plan) -> float:
    """The share of the calibration text's routed assignments that went to the removed experts."""
    removed = total = 0
    for lp in profile.layers:
        gone = set(plan.removed.get(lp.layer, ()))
        removed += sum(n for e, n in zip(lp.expert_ids, lp.selected) if e in gone)
        total += sum(lp.selected)
    return removed / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--samples", type=int, default=256, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--calibrations", nargs="+", default=["english", "code", "both"],
                    choices=["english", "code", "both"])
    ap.add_argument("--scope", default="global", choices=["global", "per-layer"])
    ap.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    ap.add_argument("--no-unigram", action="store_true", help="skip the unigram baseline (tokenizes the train split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    model_dir = args.checkpoint
    cfg = load_config(model_dir)
    reader = CheckpointReader(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    total, active = parameter_counts(cfg)
    result = {"checkpoint": str(model_dir), "parameters": total, "active_parameters_per_token": active,
              "safetensors_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
              "windows": args.windows, "length": args.length, "samples": args.samples, "seq_len": args.seq_len,
              "scope": args.scope, "fp32": {}, "profiles": {}, "rows": []}
    test = {}
    for d in DOMAINS:
        ids = tok.encode((model_dir / f"test.{d}.txt").read_text().replace(DOC_SEPARATOR, "\n")).ids
        test[d] = windows(ids, args.length, args.windows)
    base_model = DeepseekReference.from_checkpoint(reader)
    for d in DOMAINS:
        r = evaluate(base_model, None, test[d])
        entry = {"perplexity": r["perplexity"], "tokens": r["tokens"],
                 "test_load": {str(k): v for k, v in r["expert_load"].items()}}
        if not args.no_unigram:
            train_ids = np.asarray(tok.encode((args.corpora / f"{d}.train.txt").read_text()).ids)
            entry["unigram_perplexity"] = unigram_perplexity(train_ids, test[d], cfg.vocab_size)
        result["fp32"][d] = entry
        print(f"fp32 {d}: perplexity {entry['perplexity']:.2f}"
              + (f" (unigram {entry['unigram_perplexity']:.1f})" if "unigram_perplexity" in entry else "")
              + f" on {r['tokens']} tokens", flush=True)
    del base_model

    files = {"english": [args.corpora / "english.train.txt"], "code": [args.corpora / "code.train.txt"]}
    files["both"] = files["english"] + files["code"]
    for calib in args.calibrations:
        profile = calibrate(model_dir, files[calib], args.samples, args.seq_len)
        result["profiles"][calib] = {str(lp.layer): load_imbalance(lp.selected) for lp in profile.layers}
        for fraction in args.fractions:
            for criterion in args.criteria:
                plan = plan_pruning(cfg, profile, PruneConfig(fraction, criterion, args.scope))
                pruned = DeepseekReference.from_checkpoint(reader.with_config(cfg.with_kept_experts(plan.kept)))
                share = removed_share(profile, plan)
                for d in DOMAINS:
                    ppl = evaluate(pruned, None, test[d])["perplexity"]
                    delta = ppl / result["fp32"][d]["perplexity"] - 1
                    result["rows"].append({"calibrated_on": calib, "evaluated_on": d, "fraction": fraction,
                                           "criterion": criterion, "perplexity": ppl, "delta": delta,
                                           "removed": {str(k): v for k, v in plan.removed.items()},
                                           "removed_assignment_share": share, "refused": plan.skipped})
                    print(f"calib {calib:7s} {fraction:.3f} {criterion:12s} eval {d:7s}: ppl {ppl:8.2f} "
                          f"({delta:+.2%}); removed {share:.1%} of calibration assignments", flush=True)
                del pruned
    result["seconds"] = time.perf_counter() - t0

    def delta(calib, fraction, criterion, d):
        return next(r["delta"] for r in result["rows"] if (r["calibrated_on"], r["fraction"], r["criterion"],
                                                           r["evaluated_on"]) == (calib, fraction, criterion, d))

    print(f"\n{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M read per token, "
          f"{result['safetensors_bytes'] / 1e6:.2f} MB safetensors")
    print("fp32 perplexity: " + ", ".join(
        f"{d} {e['perplexity']:.2f}" + (f" (unigram {e['unigram_perplexity']:.1f})" if "unigram_perplexity" in e else "")
        for d, e in result["fp32"].items()))
    print(f"\nperplexity change vs fp32, {args.scope} scope ({args.samples} x {args.seq_len} calibration tokens; "
          f"{args.windows} x {args.length} test windows)")
    header = f"{'calibrated on':14s} {'fraction':>8s} {'criterion':12s} " + " ".join(f"{d:>9s}" for d in DOMAINS)
    print(header)
    for calib in args.calibrations:
        for fraction in args.fractions:
            for criterion in args.criteria:
                print(f"{calib:14s} {fraction:8.3f} {criterion:12s} "
                      + " ".join(f"{delta(calib, fraction, criterion, d):+9.2%}" for d in DOMAINS))
    in_domain = [c for c in args.calibrations if c in DOMAINS]
    if in_domain:
        print("\nin-domain (calibrated and evaluated on the same corpus), average over corpora")
        summary = {}
        for fraction in args.fractions:
            for criterion in args.criteria:
                values = [delta(c, fraction, criterion, c) for c in in_domain]
                summary[f"{fraction}/{criterion}"] = {c: v for c, v in zip(in_domain, values)} | {"mean": float(np.mean(values))}
                print(f"  {fraction:.3f} {criterion:12s} " + " ".join(f"{c} {v:+.2%}" for c, v in zip(in_domain, values))
                      + f"  mean {np.mean(values):+.2%}")
        result["in_domain"] = summary
    print("\nexpert load imbalance per MoE layer (max / mean tokens per expert; cv of the shares; experts never chosen)")
    for name, layers in list(result["profiles"].items()) + [(f"test {d}", e["test_load"]) for d, e in result["fp32"].items()]:
        print(f"  {name:14s} " + "  ".join(
            f"L{k}: {v['max_over_mean']:.2f} cv {v['cv']:.2f}" + (f" never {v['never']}" if v.get("never") else "")
            for k, v in layers.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
