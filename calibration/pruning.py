"""Which routed experts to remove, from a calibration profile.

Criteria (a higher score keeps an expert):
  frequency     tokens routed to the expert
  contribution  REAP's saliency, the mean over routed tokens of routing weight x ||output||,
                shrunk for rarely routed experts: the sum is divided by max(tokens, min_tokens),
                so an expert seen on two tokens cannot look important from two samples.
  output-mass   the sum over routed tokens of routing weight x ||output||: the share of the
                layer's output removing the expert takes away, on the calibration text
                (frequency x contribution). Measured on the embedded model (docs/pruning.md):
                the smallest loss when deployment text is like the calibration text;
                `contribution` is the most robust when it is not.
Scopes:
  per-layer     every MoE layer loses round(fraction x its experts)
  global        round(fraction x all routed experts) go where the scores are lowest; scores are
                divided by their layer's mean first, so layers of larger activations do not
                keep everything.
Removal goes from the lowest score up and skips an expert whose removal would leave routing
ill-defined: fewer than top-k experts, or (group-limited routing) some choice of topk_group
groups holding fewer than top-k experts (ModelConfig.routable). Routing after removal: router
rows and correction-bias entries of removed experts are dropped; sigmoid scores (V3) are
per-expert, so that equals masking them; softmax scores (V2) renormalize over the experts that
remain, which cancels out exactly when norm_topk_prob normalizes the chosen weights and scales
them up otherwise (docs/pruning.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsexport.core.config import ModelConfig
from dsexport.core.errors import UserError
from dsexport.core.quant import QuantSpec, expert_bytes
from dsexport.core.sections import PRUNE_METHODS, PruningRecord

from .profile import Profile

CRITERIA = ("frequency", "contribution", "output-mass")
DEFAULT_CRITERION = "output-mass"
SCOPES = ("per-layer", "global")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    fraction: float
    criterion: str = DEFAULT_CRITERION
    scope: str = "global"
    method: str = "drop"  # "merge": removed experts are merged into the most similar kept ones (calibration/merging.py)

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise UserError(f"--prune takes a fraction of routed experts between 0 and 1, got {self.fraction}")
        if self.criterion not in CRITERIA:
            raise UserError(f"--prune-by must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in SCOPES:
            raise UserError(f"--prune-scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.method not in PRUNE_METHODS:
            raise UserError(f"--prune-method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}")


@dataclasses.dataclass
class PruningPlan:
    config: PruneConfig
    kept: dict[int, list[int]]  # layer -> original expert ids kept
    removed: dict[int, list[int]]
    bytes_per_expert: int  # one routed expert (with its router row and bias) at the spec it was priced at
    skipped: int  # removals refused to keep routing well defined
    bytes_saved: int = 0  # every removed expert at its own width

    def to_record(self, profile: Profile | None = None) -> PruningRecord:
        calibration = None
        if profile is not None:
            calibration = {"model": profile.model, "data": profile.data, "samples": profile.samples,
                           "seq_len": profile.seq_len, "tokens": profile.tokens}
        return PruningRecord(self.config.fraction, self.config.criterion, self.config.scope,
                             sum(len(r) for r in self.removed.values()),
                             sum(len(k) + len(self.removed[layer]) for layer, k in self.kept.items()),
                             self.bytes_saved, self.bytes_per_expert, self.skipped,
                             {layer: (tuple(self.kept[layer]), tuple(self.removed[layer])) for layer in self.kept},
                             calibration, self.config.method)

    def to_json(self, profile: Profile | None = None) -> dict:
        return self.to_record(profile).to_json()


def removed_expert_bytes(cfg: ModelConfig, quant: QuantSpec | None, layer: int, expert_id: int) -> int:
    """What removing one routed expert saves: its weights at its width, its router row and bias entry."""
    return int(expert_bytes(cfg, quant, layer, expert_id) + 4 * cfg.hidden_size + (4 if cfg.uses_correction_bias else 0))


def expert_scores(profile: Profile, criterion: str) -> dict[int, np.ndarray]:
    scores = {}
    for lp in profile.layers:
        selected = np.asarray(lp.selected, float)
        total = np.asarray(lp.contribution, float) * selected  # back to the sum
        if criterion == "frequency":
            scores[lp.layer] = selected
        elif criterion == "output-mass":
            scores[lp.layer] = total
        else:
            scores[lp.layer] = total / np.maximum(selected, profile.min_tokens)
    return scores


def check_profile_matches(profile: Profile, cfg: ModelConfig, config_sha256: str | None = None) -> None:
    m = profile.model
    if (m["num_hidden_layers"], m["n_routed_experts"]) != (cfg.num_hidden_layers, cfg.n_routed_experts) or (
            config_sha256 and m.get("config_sha256") != config_sha256):
        raise UserError(f"the calibration profile is of another model ({m['checkpoint']}, {m['num_hidden_layers']} "
                        f"layers, {m['n_routed_experts']} experts); calibrate this checkpoint")


def plan_pruning(cfg: ModelConfig, profile: Profile, prune: PruneConfig, quant: QuantSpec | None = None) -> PruningPlan:
    """Which experts to remove; the bytes saved are priced at `quant` (None: fp32), the bundle's spec."""
    check_profile_matches(profile, cfg)
    scores = expert_scores(profile, prune.criterion)
    kept = {lp.layer: list(lp.expert_ids) for lp in profile.layers}
    candidates = []  # (normalized score, layer, expert id)
    for lp in profile.layers:
        s = scores[lp.layer]
        norm = s / s.mean() if prune.scope == "global" and s.mean() > 0 else s
        candidates += [(float(v), lp.layer, e) for v, e in zip(norm, lp.expert_ids)]
    candidates.sort()
    if prune.scope == "per-layer":
        budget = {layer: int(round(prune.fraction * len(ids))) for layer, ids in kept.items()}
    else:
        budget = {None: int(round(prune.fraction * sum(len(ids) for ids in kept.values())))}
    removed: dict[int, list[int]] = {layer: [] for layer in kept}
    skipped = 0
    for _, layer, e in candidates:
        key = layer if prune.scope == "per-layer" else None
        if budget[key] == 0:
            continue
        remaining = [x for x in kept[layer] if x != e]
        if not cfg.routable(remaining):
            skipped += 1
            continue
        kept[layer] = remaining
        removed[layer].append(e)
        budget[key] -= 1
    removed = {k: sorted(v) for k, v in removed.items()}
    saved = sum(removed_expert_bytes(cfg, quant, layer, e) for layer, ids in removed.items() for e in ids)
    first = next(iter(cfg.moe_layers), 0)
    return PruningPlan(prune, kept, removed, removed_expert_bytes(cfg, quant, first, 0), skipped, saved)


def plan_expert_bits(cfg: ModelConfig, profile: Profile, bits: int, fraction: float,
                     criterion: str = DEFAULT_CRITERION, kept: dict[int, list[int]] | None = None) -> dict[int, dict[int, int]]:
    """{layer: {expert id: bits}} for the `fraction` of routed experts (of those kept) that score
    highest, over all MoE layers (scores divided by their layer's mean, as the global scope)."""
    if not 0 < fraction <= 1 or bits not in (4, 8):
        raise UserError(f"--expert-bits takes BITS:FRACTION with BITS 4 or 8 and FRACTION in (0, 1], got {bits}:{fraction}")
    check_profile_matches(profile, cfg)
    scores = expert_scores(profile, criterion)
    ranked = []
    for lp in profile.layers:
        s = scores[lp.layer]
        norm = s / s.mean() if s.mean() > 0 else s
        ranked += [(float(v), lp.layer, e) for v, e in zip(norm, lp.expert_ids)
                   if kept is None or e in kept.get(lp.layer, lp.expert_ids)]
    ranked.sort(reverse=True)
    out: dict[int, dict[int, int]] = {}
    for _, layer, e in ranked[: int(round(fraction * len(ranked)))]:
        out.setdefault(layer, {})[e] = bits
    return out
