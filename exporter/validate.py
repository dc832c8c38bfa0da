"""`dsexport validate --reference CKPT`: the bundle against the reference model, on real text.

Two verdicts (docs/validate.md):

  exactness  the bundle against the reference running the bundle's own compression plan (kept
             experts, dequantized weights, the kernels' activation rounding): is the bundle a
             correct lowering? Bundles whose kernels compute exactly are held to every logit
             (max |diff| 1e-3). Bundles whose kernels round activations to int8 differ wherever
             one value lands on a rounding boundary in one implementation and not the other, and
             end to end such a flip moves every later position; so the reference runs each window
             on the bundle's own latent cache (reference.ForcedLatents): a flip stays at its
             position, the latent itself is compared position by position, and the checks are
             statistics a flip cannot move but a wrong weight, expert or router does: the median
             position, the worst expert's median position (positions grouped by the expert the
             reference routes them to), latent agreement and top-1 agreement. The max is reported.
  quality    the bundle against the original model (no pruning, no quantization): perplexity on the
             user's data within a budget per precision (`--max-quality-loss`), with the KL divergence
             of next-token distributions reported. A bundle that lost a fifth of its quality fails
             here even when it is a perfect lowering of its plan.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from dsexport.core.errors import UserError
from dsexport.core.quant import AWQ_FILE
from dsexport.runtime.validate import (Check, Report, Thresholds, match_length, quality_budget)

from .awq import load_scales, with_awq
from .checkpoint import CheckpointReader
from .reference import DeepseekReference, ForcedLatents, LatentCache, MoE

BUILTIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Experts are routed by a gate, and only the chosen ones run for each token. Latent attention keeps the "
    "cache small: a few hundred numbers per token and layer instead of thousands. Edge devices have little "
    "memory and less bandwidth, so every byte read per token counts, and a model that fits is one that runs."
)
LATENT_MATCH = 1e-2  # a position's latent agrees when every value is within this (flips move ~0.1-1)


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
                    record = json.loads(line)
                    texts.append(record["text"] if isinstance(record["text"], str) else None)
                except (json.JSONDecodeError, KeyError, TypeError):
                    texts.append(None)
                if texts[-1] is None:
                    raise UserError(f"--data {path}: line {n} is not a JSON object with a \"text\" string")
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


def _nll(logits: np.ndarray, tokens: list[int]) -> float:
    return -float(np.take_along_axis(_log_softmax(logits[:-1]), np.asarray(tokens[1:])[:, None], 1).sum())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per position, p the reference."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


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


def reference_model_for(engine, checkpoint: Path, original: bool = False) -> DeepseekReference:
    """The reference from the checkpoint: with the bundle's compression plan applied (kept experts,
    dequantized weights), or the original model (original=True)."""
    reader = CheckpointReader(checkpoint)
    bundle_cfg = engine.manifest.model
    if reader.config.unpruned() != bundle_cfg.unpruned():
        raise UserError(f"--reference {checkpoint}: its config.json describes a different model than the bundle's")
    if original:
        return DeepseekReference.from_checkpoint(reader.original())
    pruning, quant = engine.manifest.pruning, engine.manifest.quantization
    view = reader.with_config(bundle_cfg).with_merges(pruning.merges if pruning else None)
    if quant is not None and quant.method == "awq":  # the bundle's own scales (listed and verified)
        view = with_awq(view, load_scales(engine.bundle.path(AWQ_FILE, "quantization.method"), bundle_cfg))
    return DeepseekReference.from_checkpoint(view, quant)


@dataclasses.dataclass
class Exactness:
    """Per position over all windows, the bundle against the same-plan reference."""
    logit_diff: list = dataclasses.field(default_factory=list)  # per-position max |diff|
    latent_diff: list = dataclasses.field(default_factory=list)  # per-position max over layers (synced runs)
    by_expert: dict = dataclasses.field(default_factory=dict)  # (layer, slot) -> per-position diffs routed to it
    agree: int = 0
    positions: int = 0
    nll_bundle: float = 0.0
    nll_reference: float = 0.0
    tf_match: list = dataclasses.field(default_factory=list)
    lengths: list = dataclasses.field(default_factory=list)
    kl: list = dataclasses.field(default_factory=list)

    def add(self, tokens: list[int], got: np.ndarray, ref: np.ndarray, routes: dict | None = None,
            latent_diff: np.ndarray | None = None) -> None:
        d = np.abs(got - ref).max(-1)  # [T]
        self.logit_diff.append(d)
        if latent_diff is not None:
            self.latent_diff.append(latent_diff)
        for layer, slots in (routes or {}).items():  # slots [T, k]
            for t, row in enumerate(slots):
                for slot in row:
                    self.by_expert.setdefault((layer, int(slot)), []).append(float(d[t]))
        same = got.argmax(-1) == ref.argmax(-1)
        self.agree += int(same.sum())
        self.positions += len(tokens)
        self.tf_match.append(int(np.argmin(same)) if not same.all() else len(tokens))
        self.lengths.append(len(tokens))
        self.nll_bundle += _nll(got, tokens)
        self.nll_reference += _nll(ref, tokens)
        self.kl.append(_kl(ref, got))

    def worst_expert_median(self) -> float:
        medians = [np.median(v) for v in self.by_expert.values() if len(v) >= 2]
        return float(max(medians)) if medians else 0.0


def _routes_hook(model: DeepseekReference) -> dict:
    routes: dict[int, np.ndarray] = {}
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.route_recorder = (lambda i: lambda idx: routes.__setitem__(i, idx.numpy().copy()))(layer.layer)
    return routes


@torch.no_grad()
def compare_window(engine, model: DeepseekReference, tokens: list[int], synced: bool,
                   stats: Exactness) -> np.ndarray:
    """One window through the bundle and the reference; returns the bundle's logits [T, V]."""
    ids = np.asarray([tokens], np.int64)
    T = len(tokens)
    got, cache = engine.forward(ids, np.arange(T)[None], np.ones_like(ids), engine.empty_cache(1))
    got = got[0]
    if not synced:
        stats.add(tokens, got, model(torch.tensor([tokens]))[0].numpy())
        return got
    latents = [torch.from_numpy(np.asarray(a, np.float32)) for a in engine.backend.cache_to_host(cache)]
    forced = ForcedLatents(latents)
    routes = _routes_hook(model)
    ref = model(torch.tensor([tokens]), cache=forced)[0].numpy()
    latent_diff = np.max([(forced.own[i] - latents[i]).abs().amax(-1)[0].numpy() for i in forced.own], axis=0)
    stats.add(tokens, got, ref, {i: r.reshape(T, -1) for i, r in routes.items()}, latent_diff)
    return got


def _exactness_checks(stats: Exactness, limits: Thresholds, synced: bool) -> tuple[dict, list[Check]]:
    diffs = np.concatenate(stats.logit_diff)
    ppl_bundle = float(np.exp(stats.nll_bundle / max(stats.positions - len(stats.tf_match), 1)))
    ppl_ref = float(np.exp(stats.nll_reference / max(stats.positions - len(stats.tf_match), 1)))
    metrics = {"max_abs_logit_diff": float(diffs.max()), "mean_abs_logit_diff": float(diffs.mean()),
               "median_abs_logit_diff": float(np.median(diffs)), "p99_abs_logit_diff": float(np.quantile(diffs, 0.99)),
               "top1_agreement": stats.agree / stats.positions,
               "kl_mean": float(np.concatenate(stats.kl).mean()),
               "teacher_forced_match_length": {
                   "mean": float(np.mean(stats.tf_match)), "min": int(min(stats.tf_match)), "windows": len(stats.tf_match),
                   "windows_fully_matched": sum(m == n for m, n in zip(stats.tf_match, stats.lengths))},
               "perplexity_bundle": ppl_bundle, "perplexity_reference": ppl_ref,
               "perplexity_delta_rel": ppl_bundle / ppl_ref - 1, "latent_synced": synced}
    checks = [Check("top1_agreement", metrics["top1_agreement"], limits.min_top1, "min"),
              Check("perplexity_delta_rel", abs(metrics["perplexity_delta_rel"]), limits.max_ppl_delta, "max")]
    if not synced:
        checks.insert(0, Check("max_abs_logit_diff", metrics["max_abs_logit_diff"], limits.max_logit_diff, "max"))
        return metrics, checks
    latents = np.concatenate(stats.latent_diff)
    metrics.update(latent_agreement=float((latents <= LATENT_MATCH).mean()), max_abs_latent_diff=float(latents.max()),
                   worst_expert_median_logit_diff=stats.worst_expert_median())
    checks = [Check("median_abs_logit_diff", metrics["median_abs_logit_diff"], limits.max_median_logit_diff, "max"),
              Check("worst_expert_median_logit_diff", metrics["worst_expert_median_logit_diff"],
                    limits.max_expert_logit_diff, "max"),
              Check("latent_agreement", metrics["latent_agreement"], limits.min_latent_agreement, "min")] + checks
    return metrics, checks


@torch.no_grad()
def _quality(engine, checkpoint: Path, windows: list[list[int]], bundle_logits: list[np.ndarray],
             budget: float) -> tuple[dict, list[Check]]:
    """The bundle against the original, uncompressed model: perplexity within the budget."""
    original = reference_model_for(engine, checkpoint, original=True)
    nll_o, nll_b, kls, n = 0.0, 0.0, [], 0
    for tokens, got in zip(windows, bundle_logits):
        ref = original(torch.tensor([tokens]))[0].numpy()
        nll_o += _nll(ref, tokens)
        nll_b += _nll(got, tokens)
        kls.append(_kl(ref, got))
        n += len(tokens) - 1
    del original
    ppl_o, ppl_b = float(np.exp(nll_o / n)), float(np.exp(nll_b / n))
    metrics = {"perplexity_original": ppl_o, "perplexity_bundle": ppl_b, "quality_loss_rel": ppl_b / ppl_o - 1,
               "kl_original_mean": float(np.concatenate(kls).mean()), "budget": budget}
    return metrics, [Check("quality_loss_rel", metrics["quality_loss_rel"], budget, "max")]


def validate_against_reference(engine, checkpoint: Path, data: Path | None, thresholds: Thresholds,
                               seq_len: int = 64, samples: int = 8, greedy_prompts: int = 4,
                               greedy_tokens: int = 32, max_quality_loss: float | None = None) -> Report:
    start = time.perf_counter()
    windows = token_windows(engine, read_texts(data), seq_len, samples)
    synced = engine.manifest.rounds_activations and hasattr(engine.backend, "cache_to_host")
    model = reference_model_for(engine, checkpoint)
    stats, bundle_logits = Exactness(), []
    for window in windows:
        bundle_logits.append(compare_window(engine, model, window, synced, stats))
    metrics, checks = _exactness_checks(stats, thresholds, synced)

    greedy, speeds = [], []
    for window in windows[:greedy_prompts]:
        prompt = window[: max(1, len(window) // 4)]
        result = engine.generate(prompt, max_new_tokens=greedy_tokens, ignore_eos=True)
        speeds.append(result.decode_tokens_per_s)
        greedy.append(match_length(result.output_ids, _reference_greedy(model, prompt, greedy_tokens)))
    del model
    metrics["greedy_match_length"] = {"mean": float(np.mean(greedy)), "min": int(min(greedy)), "of": greedy_tokens}
    metrics["decode_tokens_per_s"] = float(np.median(speeds))

    compressed = engine.manifest.quantization is not None or engine.manifest.pruning is not None \
        or engine.manifest.model.kept_experts is not None
    quality = {}
    if compressed:
        budget = max_quality_loss if max_quality_loss is not None else quality_budget(engine.manifest)
        quality, quality_checks = _quality(engine, checkpoint, windows, bundle_logits, budget)
        checks += quality_checks
    metrics["quality"] = quality or None
    data_info = {"source": str(data) if data else "builtin", "sequences": len(windows),
                 "tokens": sum(len(w) for w in windows)}
    return Report(str(engine.directory), "reference", engine.manifest.precision, metrics, checks, data_info,
                  time.perf_counter() - start)
