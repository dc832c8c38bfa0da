"""Whether MTP drafting pays on this machine, decided at load (Engine.load(draft="auto")).

Drafting turns one decoder step of 1 token into one of 2 (the previous token and the draft)
plus a run of the MTP graph, and yields 1 + a tokens per step at acceptance a. It pays when

    (1 + a) x t1 > t2 + t_draft

t1, t2 and t_draft are measured here on the loaded bundle (medians of a few steps after a short
prompt, the decoder's cache as in decoding); a is ACCEPTANCE_PRIOR. On a memory-bound dense
model t2 is close to t1; on a MoE model the 2-token step also reads the union of both tokens'
experts (checkpoint M, 2 threads: t2/t1 = 1.36 at int4, 1.47 at fp32), and the same bundle
measures differently on a busy machine (the embedded model: 1.12 idle, 2.4 with another job on
one of the two cores), so the answer depends on the model, the device and its load: a
measurement at load rather than a per-target constant (docs/mtp.md).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

# Acceptance of the draft token: measured 0.71 on the embedded model's test split (benchmarks/mtp.py,
# benchmarks/results/mtp-embedded.json); DeepSeek-V3 reports 0.85-0.90 for its MTP module.
ACCEPTANCE_PRIOR = 0.7
MIN_SPEEDUP = 1.05  # below this the measurement's noise could make drafting a loss
PROBE_PROMPT_TOKENS = 16
PROBE_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class DraftDecision:
    draft: bool
    reason: str
    t1_ms: float | None = None
    t2_ms: float | None = None
    draft_ms: float | None = None
    acceptance_prior: float = ACCEPTANCE_PRIOR
    predicted_speedup: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def step_costs(engine, drafter, prompt_tokens: int = PROBE_PROMPT_TOKENS, repeats: int = PROBE_REPEATS) -> dict:
    """Median seconds of a decoder step with 1 and with 2 new tokens after `prompt_tokens`, and of
    the MTP graph on 1 token (drafter None: no draft time). The steps do not change the engine."""
    vocab = engine.config.vocab_size
    prompt = np.random.default_rng(0).integers(3, min(vocab, 300), size=prompt_tokens)
    T = len(prompt)
    _, cache = engine.forward(prompt[None], np.arange(T)[None], np.ones((1, T), np.int64), engine.empty_cache(1))
    hidden = np.zeros((1, 1, engine.config.hidden_size), np.float32)
    times = {1: [], 2: [], "draft": []}
    for _ in range(repeats):
        for n in (1, 2):
            ids = np.full((1, n), int(prompt[-1]), np.int64)
            t0 = time.perf_counter()
            engine.forward(ids, np.arange(T, T + n)[None], np.ones((1, T + n), np.int64), cache)
            times[n].append(time.perf_counter() - t0)
        if drafter is not None:
            t0 = time.perf_counter()
            drafter.forward(hidden, ids[:, :1], np.array([[T]]), np.ones((1, 1), np.int64), drafter.empty_cache())
            times["draft"].append(time.perf_counter() - t0)
    return {"t1_s": statistics.median(times[1]), "t2_s": statistics.median(times[2]),
            "draft_s": statistics.median(times["draft"]) if times["draft"] else None}


def predicted_speedup(costs: dict, acceptance: float = ACCEPTANCE_PRIOR) -> float:
    return (1 + acceptance) * costs["t1_s"] / (costs["t2_s"] + (costs["draft_s"] or 0.0))


def decide(engine, drafter) -> DraftDecision:
    """Measure this bundle on this machine and say whether to draft."""
    if drafter is None:
        return DraftDecision(False, "the bundle has no MTP graph")
    costs = step_costs(engine, drafter)
    speedup = predicted_speedup(costs)
    ms = {"t1_ms": costs["t1_s"] * 1e3, "t2_ms": costs["t2_s"] * 1e3, "draft_ms": costs["draft_s"] * 1e3}
    if speedup >= MIN_SPEEDUP:
        return DraftDecision(True, f"predicted {speedup:.2f}x at acceptance {ACCEPTANCE_PRIOR}", predicted_speedup=speedup,
                             **ms)
    return DraftDecision(False, f"predicted {speedup:.2f}x at acceptance {ACCEPTANCE_PRIOR}: verifying 2 tokens costs "
                         f"{costs['t2_s'] / costs['t1_s']:.2f}x a 1-token step here", predicted_speedup=speedup, **ms)
