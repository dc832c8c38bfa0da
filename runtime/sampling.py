"""Next-token selection over a row of logits, in numpy, with the semantics of transformers'
logits processors: repetition penalty, then temperature, then top-k, then top-p.

Parameters are checked where they enter (finite, in range), and every row of a batch draws from
its own random stream, reproducible from (seed, row): row 0 from `seed` itself (so a prompt
sampled alone and as the first row of a batch agree), row r > 0 from a SeedSequence spawned
with key (r,).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dsexport.core.errors import UserError

MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= self.temperature <= 100:
            raise UserError(f"temperature must be between 0 and 100, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty <= 100:
            raise UserError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise UserError(f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_rng(seed: int | None, row: int) -> np.random.Generator:
    """The random stream of one row of a batch (see the module docstring)."""
    if seed is None:
        return np.random.default_rng()
    if row == 0:
        return np.random.default_rng(seed)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(row,)))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style: logits of seen tokens are divided by the penalty when positive, multiplied when not."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    ids = np.unique(seen)
    vals = logits[ids]
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 seen: np.ndarray | None = None) -> int:
    """One token id from logits [V] (float32)."""
    if params.greedy and (params.repetition_penalty == 1.0 or seen is None):
        return int(np.argmax(logits))  # the common decode path: no copies
    if params.greedy:
        return int(np.argmax(apply_repetition_penalty(logits.astype(np.float64), seen, params.repetition_penalty)))
    probs = token_distribution(logits, params, seen)
    return int(rng.choice(probs.size, p=probs))


def token_distribution(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None) -> np.ndarray:
    """The distribution sample_token draws from when sampling (temperature > 0): probs [V] float64.
    Speculative decoding's acceptance rule needs it explicitly (runtime/speculative.py)."""
    logits = logits.astype(np.float64)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs
