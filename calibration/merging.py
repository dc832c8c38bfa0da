"""Which kept expert absorbs each removed one (`--prune-method merge`), and with what weight.

The pruning plan (calibration/pruning.py) chooses what to remove; merging then folds each
removed expert into the kept expert of its layer whose router row is most similar (cosine):
experts the router treats alike receive the same kind of tokens, which is what MC-SMoE (Li et
al. 2024) found the best grouping signal, and it needs nothing beyond the checkpoint. The merged
weights average the aligned experts (exporter/merge.py) weighted by how many calibration tokens
each was routed: an expert the text never reached adds nothing and is simply dropped.
"""

from __future__ import annotations

import dataclasses

import torch

from dsexport.core.sections import ExpertMerge, PruningRecord
from dsexport.exporter.checkpoint import CheckpointReader

from .profile import Profile


def router_similarity(router: torch.Tensor, removed: list[int], kept: list[int]) -> torch.Tensor:
    """[R, K] cosine similarity of the removed experts' router rows to the kept ones'."""
    rows = router / router.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [E, D]
    return rows[removed] @ rows[kept].T


def layer_merges(router: torch.Tensor, kept: list[int], removed: list[int],
                 selected: dict[int, int]) -> tuple[ExpertMerge, ...]:
    """Each removed expert the calibration text routed to goes into its most similar kept expert."""
    sources = [e for e in removed if selected.get(e, 0) > 0]
    if not sources:
        return ()
    best = router_similarity(router, sources, kept).argmax(dim=1)  # [R]
    groups: dict[int, list[int]] = {}
    for e, k in zip(sources, best.tolist()):
        groups.setdefault(kept[k], []).append(e)
    merges = []
    for into, group in sorted(groups.items()):
        counts = [max(selected.get(into, 0), 1)] + [selected[e] for e in group]
        total = float(sum(counts))
        coefficients = [c / total for c in counts]
        weight = 1.0 - sum(coefficients[1:])  # exactly 1 in total, whatever the rounding
        merges.append(ExpertMerge(into, weight, tuple(zip(group, coefficients[1:]))))
    return tuple(merges)


def plan_merges(reader: CheckpointReader, record: PruningRecord, profile: Profile) -> PruningRecord:
    """The pruning record with its merges filled in (method merge)."""
    cfg = reader.config
    merges = {}
    for layer, (kept, removed) in record.layers.items():
        if not removed:
            continue
        lp = profile.layer(layer)
        selected = dict(zip(lp.expert_ids, lp.selected))
        router = reader.get(f"model.layers.{layer}.mlp.gate.weight", (cfg.n_routed_experts, cfg.hidden_size))
        found = layer_merges(router, list(kept), list(removed), selected)
        if found:
            merges[layer] = found
    return dataclasses.replace(record, method="merge", merges=merges)
