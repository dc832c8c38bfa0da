"""Merging removed routed experts into kept ones (`--prune-method merge`).

calibration/merging.py decides which removed expert goes into which kept expert and with what
weight; the manifest's pruning record stores that (core/sections.py: ExpertMerge), and this
module turns it into weights, the same way for the export and for the reference `validate`
compares against, so a merged bundle is checked for exactness like a pruned one.

An expert is a SwiGLU MLP whose intermediate neurons can be permuted freely: two experts trained
separately compute similar functions with differently ordered neurons, and averaging them
neuron by neuron unaligned mostly averages unrelated neurons. So each source expert's neurons
are first matched to the kept expert's (MC-SMoE, Li et al. 2024: the assignment maximizing the
summed similarity of each neuron's gate row, up row and down column, solved exactly with the
Hungarian method), then the weights are averaged with the merge's coefficients (routing
frequency on the calibration text). Router rows stay the kept expert's: tokens that chose a
removed expert now choose among the kept ones, whose merged weights carry part of its function.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I, H], up [I, H], down [H, I]


def neuron_features(expert: Expert) -> torch.Tensor:
    """[I, 3H]: each intermediate neuron's gate row, up row and down column, unit-normalized per part."""
    gate, up, down = expert
    parts = [gate, up, down.T]  # each [I, H]
    return torch.cat([p / p.norm(dim=1, keepdim=True).clamp_min(1e-12) for p in parts], dim=1)


def align(anchor: Expert, other: Expert) -> Expert:
    """`other` with its intermediate neurons permuted to match `anchor`'s."""
    similarity = neuron_features(anchor) @ neuron_features(other).T  # [I, I]
    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    perm = torch.from_numpy(np.asarray(cols)[np.argsort(rows)])  # anchor neuron i <- other neuron perm[i]
    gate, up, down = other
    return gate[perm], up[perm], down[:, perm]


def merge_experts(anchor: Expert, sources: list[tuple[Expert, float]], anchor_weight: float) -> Expert:
    """anchor_weight x anchor + sum(w x aligned source); the weights sum to 1."""
    gate, up, down = (t * anchor_weight for t in anchor)
    for expert, w in sources:
        g, u, d = align(anchor, expert)
        gate, up, down = gate + w * g, up + w * u, down + w * d
    return gate, up, down
