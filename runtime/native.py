"""The native routed-expert kernel (runtime/native/experts.c), loaded with ctypes, or nothing.

`load()` returns the kernel library or None: not compiled (no C compiler at install time,
DSEXPORT_NATIVE=0 at install), or switched off at run time with DSEXPORT_EXPERT_KERNEL=numpy.
Callers then keep their numpy path; `status()` says which is in use and why.

`ExpertKernel` owns the kernel's thread pool. One call computes one MoE layer's routed experts
for N tokens: residual + sum_k weight_k * expert_k(x), the experts' rows split across all threads.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

import numpy as np

ENV = "DSEXPORT_EXPERT_KERNEL"  # "native" (default when built) or "numpy"
SIMD = {0: "portable C", 1: "AVX2", 2: "NEON"}
# Polls a kernel worker spins before it sleeps: long enough to span the gap between a layer's
# two phases, short enough to hand the core back to ONNX Runtime's threads for the next segment
# (paged int4 M, 2 threads, three alternating runs: 2000 polls 30.0/27.2/25.2 ms per step against
# 32.7/28.8/30.2 for 20000).
DEFAULT_SPIN = 2000


class LibraryMismatch(RuntimeError):
    """The loaded library was built from other sources than this runtime's (its structures or
    weight layouts differ): the runtime falls back to ONNX Runtime and says so."""


class MoEArgs(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("round_act", ctypes.c_int32), ("block", ctypes.c_int32),
                ("n_tokens", ctypes.c_int32), ("D", ctypes.c_int32), ("I", ctypes.c_int32),
                ("n_active", ctypes.c_int32),
                ("x", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("experts", ctypes.c_void_p), ("tok_start", ctypes.c_void_p), ("tok_index", ctypes.c_void_p),
                ("tok_weight", ctypes.c_void_p), ("panel", ctypes.c_int32)]


_lib: ctypes.CDLL | None = None
_why = ""


def library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_experts{suffix}"
        if path.is_file():
            return path
    return None


def load() -> ctypes.CDLL | None:
    """The kernel library, or None (status() says why)."""
    global _lib, _why
    if os.environ.get(ENV, "native") == "numpy":
        _why = f"{ENV}=numpy"
        return None
    if _lib is not None:
        return _lib
    override = os.environ.get("DSEXPORT_NATIVE_LIBRARY")  # another build of the library (A/B benchmarks)
    path = Path(override) if override else library_path()
    if path is None:
        _why = "not compiled (no C compiler when dsexport was installed, or DSEXPORT_NATIVE=0)"
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        _why = f"{path.name} does not load: {exc}"
        return None
    lib.dsx_pool_create.restype = ctypes.c_void_p
    lib.dsx_pool_create.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.dsx_pool_destroy.argtypes = [ctypes.c_void_p]
    lib.dsx_moe.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.dsx_moe.restype = ctypes.c_int
    _lib = lib
    return lib


def status() -> dict:
    lib = load()
    if lib is None:
        return {"routed_experts": "numpy", "reason": _why}
    simd = SIMD.get(lib.dsx_simd(), "unknown")
    if getattr(lib, "dsx_vnni", None) is not None and lib.dsx_vnni() == 1:  # an older build lacks the query
        simd += "+VNNI"
    return {"routed_experts": "native", "simd": simd, "version": lib.dsx_version()}


def address(a: np.ndarray | None) -> int:
    return 0 if a is None else a.__array_interface__["data"][0]


class ExpertKernel:
    """One thread pool and the call into dsx_moe. Not thread-safe: one caller at a time."""

    def __init__(self, lib: ctypes.CDLL, threads: int | None = None, spin: int | None = None):
        self.lib = lib
        self.threads = threads or os.cpu_count() or 1
        spin = spin if spin is not None else int(os.environ.get("DSEXPORT_KERNEL_SPIN", DEFAULT_SPIN))
        self.pool = lib.dsx_pool_create(self.threads, spin)
        if not self.pool:
            raise MemoryError("the expert kernel's thread pool could not be created")
        self.args = MoEArgs()

    def moe(self, bits: int, round_act: bool, block: int, x: np.ndarray, residual: np.ndarray | None,
            out: np.ndarray, experts: np.ndarray, tok_start: np.ndarray, tok_index: np.ndarray,
            tok_weight: np.ndarray, intermediate: int) -> np.ndarray:
        """out [N, D] = residual + sum over experts e, tokens t routed to e of weight * e(x[t]).

        experts uint64 [A, 6] (addresses of gate_up q/scales/zeros, down q/scales/zeros, the
        arrays kept alive by the caller), tok_start int32 [A+1], tok_index int32 [P],
        tok_weight float32 [P]; every array C-contiguous."""
        a = self.args
        a.bits, a.round_act, a.block = bits, int(round_act), block
        a.n_tokens, a.D = x.shape
        a.I, a.n_active = intermediate, experts.shape[0]
        a.x, a.residual, a.out = address(x), address(residual), address(out)
        a.experts, a.tok_start = address(experts), address(tok_start)
        a.tok_index, a.tok_weight = address(tok_index), address(tok_weight)
        rc = self.lib.dsx_moe(self.pool, ctypes.byref(a))
        if rc:
            raise RuntimeError(f"the native expert kernel failed ({'bad arguments' if rc == -1 else 'out of memory'})")
        return out

    def close(self) -> None:
        if self.pool:
            self.lib.dsx_pool_destroy(self.pool)
            self.pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
