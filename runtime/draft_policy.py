"""Whether MTP drafting pays on this machine, decided at load (Engine.load(draft="auto")).

Drafting replaces plain decode steps (one token each, t_token) by verify steps: the decoder on 2
tokens, the MTP graph, and the loop's bookkeeping (a rejected draft's cache entry cut back), each
yielding 1 + a tokens at acceptance a. It pays when

    (1 + a) x t_token > t_verify

Both times are measured here on the loaded bundle, by generating a few tokens after a short
prompt plainly and with drafting (medians); a is ACCEPTANCE_PRIOR (the probe's random prompt says
nothing about the acceptance real text gets). A first version predicted t_verify from the
decoder's 2-token step plus the MTP graph alone; on the embedded model that predicted x0.97 where
drafting measured x0.84, and on an idle machine it crossed the threshold: the loop's own costs
per verify matter on small models. On a MoE model the 2-token step also reads the union of both
tokens' experts (checkpoint M, 2 threads: 1.36x a 1-token step at int4, 1.47x at fp32), and the
same bundle measures differently on a busy machine, so the answer depends on the model, the
device and its load: a measurement at load rather than a per-target constant (docs/mtp.md).
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

# Acceptance of the draft token: measured 0.71 on the embedded model's test split (benchmarks/mtp.py,
# benchmarks/results/mtp-embedded.json); DeepSeek-V3 reports 0.85-0.90 for its MTP module.
ACCEPTANCE_PRIOR = 0.7
MIN_SPEEDUP = 1.05  # below this the measurement's noise could make drafting a loss
# Drafting decided at load on the prior is re-checked on the acceptance real generations get: from
# this many drafts on, it stops once even the upper 95% confidence bound of the acceptance (Wilson)
# is below break-even, where (1 + a) x t_token / t_verify = 1. A block whose drafts are all
# rejected stops after 16 drafts; one at 0.3 against a break-even of 0.5, after about 40.
MIN_OBSERVED_DRAFTS = 16
WILSON_Z = 1.645  # one-sided 95%
PROBE_PROMPT_TOKENS = 16
PROBE_NEW_TOKENS = 12
PROBE_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class DraftDecision:
    draft: bool
    reason: str
    token_ms: float | None = None  # a plain decode step (one token)
    verify_ms: float | None = None  # a drafting step (2-token decoder run, MTP graph, bookkeeping)
    acceptance_prior: float = ACCEPTANCE_PRIOR
    predicted_speedup: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def break_even(self) -> float | None:
        """The acceptance at which drafting neither gains nor loses here: t_verify / t_token - 1."""
        return self.verify_ms / self.token_ms - 1 if self.token_ms and self.verify_ms else None


def recheck(decision: DraftDecision, drafted: int, accepted: int) -> DraftDecision:
    """The decision again once real generations have drafted `drafted` tokens and kept `accepted`:
    drafting stops when the acceptance they got makes it a loss (the load-time probe assumed
    ACCEPTANCE_PRIOR; a model whose MTP block predicts worse, or text it predicts badly, gets less)."""
    if not decision.draft or drafted < MIN_OBSERVED_DRAFTS or decision.break_even is None:
        return decision
    observed = accepted / drafted
    if acceptance_upper_bound(accepted, drafted) >= decision.break_even:
        return decision
    return dataclasses.replace(decision, draft=False, reason=(
        f"stopped: acceptance {observed:.2f} over {drafted} drafts, below the {decision.break_even:.2f} at which "
        f"drafting pays here ({decision.reason})"))


def acceptance_upper_bound(accepted: int, drafted: int, z: float = WILSON_Z) -> float:
    """The Wilson score interval's upper end for accepted / drafted."""
    p, n = accepted / drafted, drafted
    centre = p + z * z / (2 * n)
    spread = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (centre + spread) / (1 + z * z / n)


def step_costs(engine, drafter, prompt_tokens: int = PROBE_PROMPT_TOKENS, new_tokens: int = PROBE_NEW_TOKENS,
               repeats: int = PROBE_REPEATS) -> dict:
    """Median seconds per plain decode step and per drafting (verify) step, from short greedy
    generations after a random prompt. Leaves the engine without a drafter."""
    prompt = np.random.default_rng(0).integers(3, min(engine.config.vocab_size, 300), size=prompt_tokens).tolist()
    token, verify = [], []
    try:
        for _ in range(repeats):
            engine.drafter = None
            plain = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
            token.append(1.0 / plain.decode_tokens_per_s)
            engine.drafter = drafter
            stats = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).draft_stats
            verify.append(stats.decode_s / max(stats.decoder_runs, 1))
    finally:
        engine.drafter, engine.last_draft_stats = None, None
    return {"token_s": statistics.median(token), "verify_s": statistics.median(verify)}


def predicted_speedup(costs: dict, acceptance: float = ACCEPTANCE_PRIOR) -> float:
    return (1 + acceptance) * costs["token_s"] / costs["verify_s"]


def decide(engine, drafter) -> DraftDecision:
    """Measure this bundle on this machine and say whether to draft."""
    if drafter is None:
        return DraftDecision(False, "the bundle has no MTP graph")
    costs = step_costs(engine, drafter)
    speedup = predicted_speedup(costs)
    ms = {"token_ms": costs["token_s"] * 1e3, "verify_ms": costs["verify_s"] * 1e3}
    why = f"predicted {speedup:.2f}x at acceptance {ACCEPTANCE_PRIOR}"
    if speedup >= MIN_SPEEDUP:
        return DraftDecision(True, why, predicted_speedup=speedup, **ms)
    return DraftDecision(False, f"{why}: a verify step costs {costs['verify_s'] / costs['token_s']:.2f}x a plain "
                         "step here", predicted_speedup=speedup, **ms)
