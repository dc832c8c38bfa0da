"""Rotary embedding frequencies, default and YaRN, computed in float32 the way DeepSeek and
transformers 5 compute them (so the exported inv_freq initializer is bit-identical)."""

from __future__ import annotations

import math

import torch

from dsexport.core.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [qk_rope_head_dim/2] and the factor that scales cos and sin."""
    r = cfg.rope
    dim = cfg.qk_rope_head_dim
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    if r.type == "default":
        return 1.0 / pos_freqs, 1.0

    factor = r.factor
    if r.attention_factor is not None:
        attention_factor = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(r.theta)
        )

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq_extra = 1.0 / pos_freqs
    inv_freq_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_freq_inter * (1 - extrapolation) + inv_freq_extra * extrapolation
    return inv_freq, attention_factor


def rope_deinterleave_permutation(dim: int) -> torch.Tensor:
    """Row order that turns interleaved rope pairs (x0,x1),(x2,x3).. into halves [x0,x2,..|x1,x3,..].

    Applied to the rope rows of q and k projections at export, it lets the graph use the plain
    rotate-half formula for interleaved checkpoints: q.k is unchanged by a shared permutation.
    """
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
