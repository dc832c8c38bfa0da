"""Memory bandwidth as the benchmarks measure it: the figure of merit's denominator."""

from __future__ import annotations

import threading
import time

import numpy as np


def copy_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes read + written per second copying `gib` GiB with `threads` threads, best of `repeats`."""
    src = np.ones(int(gib * 2**30) // 8)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(bounds, bounds[1:])]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best
