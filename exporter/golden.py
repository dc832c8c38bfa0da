"""Golden outputs a build stores in the bundle, computed by the reference model (golden schema 2).

  cases     for a few fixed prompts: the greedy continuation and the reference's top-k logits at
            every continuation position (teacher-forced on the same tokens, so a near-tie the
            bundle resolved differently does not shift later positions)
  coverage  token windows chosen so that every kept expert of every MoE layer is routed to at
            least once, with the reference's top-k logits at every position and, per layer and
            position, the experts the reference routed to: `validate` on a device groups the
            bundle's differences by expert, so one corrupted expert fails on its own positions
  quality   compressed bundles (pruned or quantized): the original model's (unpruned,
            unquantized) per-token negative log-likelihood on a few windows of text, so a device
            re-checks the quality budget without torch (docs/validate.md)

The reference runs layer by layer (reference.streamed_logits): each pass costs one more read of
the checkpoint, never a second copy of the model in memory. The build also checks here that the
exported graph agrees with the reference: a bundle whose greedy tokens leave the reference's at
a clear margin is never written.
"""

from __future__ import annotations

import numpy as np
import torch

from dsexport.core.errors import InternalError
from dsexport.runtime.golden import GOLDEN_SCHEMA
from dsexport.runtime.validate import ACTIVATION_QUANT_LOGIT_TOL

from .checkpoint import CheckpointReader
from .reference import streamed_logits

GOLDEN_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning",
    "def fibonacci(n):",
    "Edge devices have little memory, so",
)
NEW_TOKENS = 16
TOP_K = 8
BUILD_LOGIT_TOL = 1e-3  # the fp32 validate default; see docs/validate.md
COVERAGE_WINDOW = 32
COVERAGE_WINDOWS = 24  # at most: random windows are added until every expert is routed to
COVERAGE_TRIES = 4 * COVERAGE_WINDOWS  # random windows tried at most
QUALITY_TOKENS = 64


def logit_tolerance(quant) -> float:
    """The build's parity tolerance for a bundle of this QuantSpec (None: fp32 weights)."""
    return ACTIVATION_QUANT_LOGIT_TOL if quant is not None and quant.rounds_activations else BUILD_LOGIT_TOL


def golden_prompts(engine, vocab_size: int) -> list[list[int]]:
    if engine.tokenizer is not None:
        return [engine.encode(p) or [0] for p in GOLDEN_PROMPTS]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (8, 3, 5, 6)]


def golden_generations(engine, vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, the bundle's greedy continuations): the graph's half of the golden outputs."""
    prompts = golden_prompts(engine, vocab_size)
    return prompts, [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).output_ids for p in prompts]


def _top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    return order, np.take_along_axis(logits, order, axis=1)


def _greedy_cases(reader, prompts, outputs, quant) -> list[dict]:
    reference = streamed_logits(reader, [p + o for p, o in zip(prompts, outputs)], quant)
    cases = []
    for n, (prompt, output, logits) in enumerate(zip(prompts, outputs, reference)):
        order, top = _top(logits[len(prompt) - 1:-1].numpy())  # [new, k]: the positions that predict `output`
        for step, token in enumerate(output):
            if order[step, 0] != token and top[step, 0] - top[step, 1] > 2 * logit_tolerance(quant):
                raise InternalError(f"exported graph disagrees with the reference model: greedy token {step} of "
                                    f"golden prompt {n} is {token}, the reference's is {order[step, 0]} by a margin "
                                    f"of {top[step, 0] - top[step, 1]:.3g}")
        cases.append({"kind": "greedy", "prompt_ids": prompt, "output_ids": output, "top_ids": order.tolist(),
                      "top_logits": top.astype(float).round(7).tolist()})
    return cases


def _coverage(reader: CheckpointReader, quant) -> dict:
    """Random windows until every kept expert is routed to (at most COVERAGE_WINDOWS kept, and at
    most COVERAGE_TRIES tried: an expert that random tokens never reach, as a specialized model
    has, must not keep the build looping; it is reported as uncovered)."""
    cfg = reader.config
    rng = np.random.default_rng(1)
    wanted = {i: set(range(cfg.num_experts(i))) for i in cfg.moe_layers}
    windows, routes, logits, tried = [], {i: [] for i in wanted}, [], 0
    while any(wanted.values()) and len(windows) < COVERAGE_WINDOWS and tried < COVERAGE_TRIES:
        batch = [rng.integers(0, cfg.vocab_size, size=COVERAGE_WINDOW).tolist() for _ in range(4)]
        tried += len(batch)
        got: dict[int, list] = {}
        out = streamed_logits(reader, batch, quant, routes=got)
        for b, window in enumerate(batch):
            if not any(wanted[i] & set(got[i][b].ravel().tolist()) for i in wanted) and windows:
                continue  # routes to nothing new
            windows.append(window)
            logits.append(out[b].numpy())
            for i in wanted:
                routes[i].append(got[i][b])
                wanted[i] -= set(got[i][b].ravel().tolist())
    cases = []
    for n, (window, lg) in enumerate(zip(windows, logits)):
        order, top = _top(lg)  # [T, k]: every position
        cases.append({"tokens": window, "top_ids": order.tolist(), "top_logits": top.astype(float).round(7).tolist(),
                      "routes": {str(i): routes[i][n].tolist() for i in routes}})
    total = sum(cfg.num_experts(i) for i in cfg.moe_layers)
    missing = {str(i): sorted(cfg.expert_ids(i)[s] for s in slots) for i, slots in wanted.items() if slots}
    return {"cases": cases, "experts": total, "covered": total - sum(len(v) for v in missing.values()),
            "uncovered": missing}


def quality_windows(engine) -> list[list[int]]:
    """Token windows of the built-in text (validate's) for the quality section: taken while the
    bundle's engine (and its tokenizer) is loaded."""
    from .validate import BUILTIN_TEXT

    if engine.tokenizer is None:
        return []
    tokens = engine.encode(BUILTIN_TEXT)[: 2 * QUALITY_TOKENS]
    windows = [tokens[i:i + QUALITY_TOKENS] for i in range(0, len(tokens), QUALITY_TOKENS)]
    return [w for w in windows if len(w) >= 8]


def _quality(reader: CheckpointReader, windows: list[list[int]]) -> dict | None:
    """The original model's per-token NLL on the windows, for the device's quality check."""
    if not windows:
        return None
    original = reader.original()
    out = []
    for window, logits in zip(windows, streamed_logits(original, windows, None)):
        logp = torch.log_softmax(logits[:-1].double(), -1)
        nll = -logp.gather(1, torch.tensor(window[1:])[:, None])[:, 0]
        out.append({"tokens": window, "nll": nll.numpy().round(7).tolist()})
    nll = np.concatenate([w["nll"] for w in out])
    return {"windows": out, "perplexity_original": float(np.exp(nll.mean()))}


def make_golden(reader: CheckpointReader, prompts: list[list[int]], outputs: list[list[int]], quant=None,
                quality: list[list[int]] | None = None, seal: str | None = None) -> dict:
    """The reference's half: its top-k logits along the bundle's continuations (and the check that
    the bundle's greedy tokens are the reference's), the expert-coverage windows, and for a
    compressed bundle (quality: its windows) the original model's quality figures. quant: the
    bundle's QuantSpec; the reference then runs the same dequantized weights."""
    golden = {"schema": GOLDEN_SCHEMA, "producer": "reference", "new_tokens": NEW_TOKENS, "top_k": TOP_K,
              "cases": _greedy_cases(reader, prompts, outputs, quant)}
    if seal is not None:  # the manifest's seal (core/manifest.py): any later change to it fails verification
        golden["manifest_seal"] = seal
    if reader.config.moe_layers:
        golden["coverage"] = _coverage(reader, quant)
    section = _quality(reader, quality) if quality else None
    if section is not None:
        golden["quality"] = section
    return golden
