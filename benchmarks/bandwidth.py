"""Memory bandwidth as the benchmarks measure it: the figure of merit's denominator.

Two figures, both with `threads` threads over 1 GiB, best of `repeats`:

- copy bandwidth: bytes read + written per second by a copy (the figure the benchmarks used first);
- read bandwidth: bytes read per second by a reduction (numpy's max, vectorized, the GIL released),
  what a decode step does with its weights. On the 2-core development VM the copy figure is
  1.3-1.5x the read figure (26-33 against 19-23 GB/s): a copy's non-temporal stores add write
  bandwidth a read-only stream cannot use, so a fraction of the copy figure understates how close
  a weight-streaming kernel is to the machine's limit (docs/performance.md). On a shared host
  both move with the neighbours' load (29-59 GB/s read within one hour on 2026-12-02), so the
  benchmarks measure them again before each precision's rounds.
"""

from __future__ import annotations

import threading
import time

import numpy as np


def _best(work, arrays: list, bytes_moved: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=work, args=a) for a in arrays]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, bytes_moved / (time.perf_counter() - t0))
    return best


def _random(n: int, dtype) -> np.ndarray:
    """Distinct data: pages of one constant could be merged by the host (KSM on a VM), and a read
    of them would then come from cache."""
    return np.random.default_rng(0).random(n, dtype=dtype)


def copy_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes read + written per second copying `gib` GiB with `threads` threads, best of `repeats`."""
    src = _random(int(gib * 2**30) // 8, np.float64)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    return _best(np.copyto, [(dst[a:b], src[a:b]) for a, b in zip(bounds, bounds[1:])], 2 * src.nbytes, repeats)


def read_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes read per second by `threads` threads each reducing its share of `gib` GiB, best of `repeats`."""
    src = _random(int(gib * 2**30) // 4, np.float32)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    return _best(lambda a: a.max(), [(src[a:b],) for a, b in zip(bounds, bounds[1:])], src.nbytes, repeats)
