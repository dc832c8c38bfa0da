"""Comparing a bundle whose kernels quantize activations to int8 with the reference, position by
position, from the same cache.

Two correct implementations of an int8-activation kernel agree except where an activation lands
within float rounding of a quantization boundary (x * 127 / absmax at k + 0.5): there one of them
rounds up and the other down. Run end to end, such a flip at position p changes that position's
latent cache entry, so every later position of every later layer moves (by ~0.05 on the test
models), and whether a test sees one early depends on the CPU's float rounding. Here the
reference computes each position t from the bundle's own cache of positions < t
(present_latent has the reference's layout: normalized latent, then rotated rope key), so a flip
moves only the position where it happens and the comparison measures the lowering, not the
history of flips.
"""

from __future__ import annotations

import numpy as np
import torch

from dsexport.exporter.reference import LatentCache


def cache_synced_logits(engine, reference, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(bundle logits [T, V], reference logits [T, V]); reference position t runs from the bundle's cache."""
    T = len(tokens)
    cache = engine.empty_cache(1)
    logits, present = engine.forward(np.array([tokens]), np.arange(T)[None], np.ones((1, T), np.int64), cache)
    present = [torch.from_numpy(np.asarray(p.numpy() if hasattr(p, "numpy") else p)) for p in present]
    ref = np.zeros_like(logits[0])
    with torch.no_grad():
        for t in range(T):
            synced = LatentCache(len(present))
            if t:
                synced.layers = {i: p[:, :t].clone() for i, p in enumerate(present)}
            ref[t] = reference(torch.tensor([[tokens[t]]]), position_ids=torch.tensor([[t]]), cache=synced)[0, 0].numpy()
    return logits[0], ref
