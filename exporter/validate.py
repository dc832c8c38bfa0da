"""`dsexport validate --reference CKPT`: the bundle against the reference model, on real text.

Runs the bundle (ONNX Runtime) and the PyTorch reference on the same token windows and reports
logit differences, top-1 agreement, teacher-forced and free-running greedy match lengths,
perplexity of both and its relative delta, and the bundle's decode speed. The reference takes
the bundle's compression plan (kept experts), so a pruned bundle is checked for exactness
against the same pruning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from dsexport.core.errors import UserError
from dsexport.runtime.validate import Check, Report, Thresholds, match_length, teacher_forced_logits

from .checkpoint import CheckpointReader
from .reference import DeepseekReference, LatentCache

BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Experts are routed by a gate, and only the chosen ones run for each token. Latent attention keeps the "
    "cache small: a few hundred numbers per token and layer instead of thousands. Edge devices have little "
    "memory and less bandwidth, so every byte read per token counts, and a model that fits is one that runs."
)


def read_texts(path: Path | None) -> list[str]:
    """Plain text, or JSONL with a "text" field per line."""
    if path is None:
        return [BUILTIN_TEXT]
    if not path.is_file():
        raise UserError(f"--data {path}: not found")
    raw = path.read_text(errors="replace")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"--data {path}: line {n} is not a JSON object with a \"text\" field") from None
        return texts
    return [raw]


def token_windows(engine, texts: list[str], seq_len: int, samples: int) -> list[list[int]]:
    tokens: list[int] = []
    for text in texts:
        tokens += engine.encode(text)
        if len(tokens) >= seq_len * samples:
            break
    windows = [tokens[i:i + seq_len] for i in range(0, len(tokens) - 1, seq_len)][:samples]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise UserError("the validation data tokenizes to fewer than 2 tokens")
    return windows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@torch.no_grad()
def _reference_greedy(model: DeepseekReference, prompt: list[int], steps: int) -> list[int]:
    cache = LatentCache(model.cfg.num_hidden_layers)
    logits = model(torch.tensor([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = model(torch.tensor([[token]]), cache=cache)
    return out


def reference_model_for(engine, checkpoint: Path) -> DeepseekReference:
    """The reference from the checkpoint, with the bundle's compression plan applied."""
    reader = CheckpointReader(checkpoint)
    bundle_cfg = engine.manifest.model
    if reader.config.unpruned() != bundle_cfg.unpruned():
        raise UserError(f"--reference {checkpoint}: its config.json describes a different model than the bundle's")
    # the bundle's weights as it computes with them (kept experts, quantization): validate checks the lowering
    return DeepseekReference.from_checkpoint(reader.with_config(bundle_cfg), engine.manifest.quantization)


def validate_against_reference(engine, checkpoint: Path, data: Path | None, thresholds: Thresholds,
                               seq_len: int = 64, samples: int = 8, greedy_prompts: int = 4,
                               greedy_tokens: int = 32) -> Report:
    start = time.perf_counter()
    model = reference_model_for(engine, checkpoint)
    windows = token_windows(engine, read_texts(data), seq_len, samples)
    diffs, worst, agree, total, tf_match = [], 0.0, 0, 0, []
    nll_bundle, nll_ref = 0.0, 0.0
    for window in windows:
        got = teacher_forced_logits(engine, window)  # [T, V]
        with torch.no_grad():
            ref = model(torch.tensor([window]))[0].numpy()
        d = np.abs(got - ref)
        worst = max(worst, float(d.max()))
        diffs.append(float(d.mean()))
        same = got.argmax(-1) == ref.argmax(-1)
        agree += int(same.sum())
        total += len(window)
        tf_match.append(int(np.argmin(same)) if not same.all() else len(window))
        targets = np.asarray(window[1:])
        nll_bundle -= float(np.take_along_axis(_log_softmax(got[:-1]), targets[:, None], 1).sum())
        nll_ref -= float(np.take_along_axis(_log_softmax(ref[:-1]), targets[:, None], 1).sum())
    predicted = sum(len(w) - 1 for w in windows)
    ppl_bundle, ppl_ref = float(np.exp(nll_bundle / predicted)), float(np.exp(nll_ref / predicted))

    greedy, speeds = [], []
    for window in windows[:greedy_prompts]:
        prompt = window[: max(1, len(window) // 4)]
        result = engine.generate(prompt, max_new_tokens=greedy_tokens, ignore_eos=True)
        speeds.append(result.decode_tokens_per_s)
        greedy.append(match_length(result.output_ids, _reference_greedy(model, prompt, greedy_tokens)))

    ppl_delta = ppl_bundle / ppl_ref - 1
    metrics = {
        "max_abs_logit_diff": worst, "mean_abs_logit_diff": float(np.mean(diffs)), "top1_agreement": agree / total,
        "teacher_forced_match_length": {"mean": float(np.mean(tf_match)), "min": int(min(tf_match)),
                                        "windows_fully_matched": sum(m == len(w) for m, w in zip(tf_match, windows)),
                                        "windows": len(windows)},
        "greedy_match_length": {"mean": float(np.mean(greedy)), "min": int(min(greedy)), "of": greedy_tokens},
        "perplexity_bundle": ppl_bundle, "perplexity_reference": ppl_ref, "perplexity_delta_rel": ppl_delta,
        "decode_tokens_per_s": float(np.median(speeds)),
    }
    checks = [Check("max_abs_logit_diff", worst, thresholds.max_logit_diff, "max"),
              Check("top1_agreement", agree / total, thresholds.min_top1, "min"),
              Check("perplexity_delta_rel", abs(ppl_delta), thresholds.max_ppl_delta, "max")]
    data_info = {"source": str(data) if data else "builtin", "sequences": len(windows), "tokens": total}
    return Report(str(engine.directory), "reference", engine.manifest.precision, metrics, checks, data_info,
                  time.perf_counter() - start)
