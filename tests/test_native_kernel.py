"""The native routed-expert kernel (runtime/native/experts.c) against numpy on the same weights.

Quantized experts: numpy computes quantize_activations(x) @ dequantize_rows(w).T in float32; the
kernel sums each block as an exact integer and multiplies by the two scales. Both are exact
up to float32 summation order, so they agree to ~1e-5 relative; the tolerance is 2e-5 x the
output's scale (a rounding of an activation onto the other side of a boundary would show as an
error of one int8 step, ~1e-2 relative, and fail). fp32 experts: same bound.
The portable C path is built here too (cc -DDSX_PORTABLE) and held to the same figures.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsexport.core.quant import dequantize_rows, pack, quantize_activations, quantize_rows
from dsexport.runtime import native

ROOT = Path(__file__).resolve().parents[1]


def kernel_or_skip():
    lib = native.load()
    if lib is None:
        pytest.skip(f"native expert kernel unavailable: {native.status()['reason']}")
    return lib


def make_experts(rng, E, D, I, bits, block, scheme):
    experts = []
    for _ in range(E):
        gu = rng.standard_normal((2 * I, D)).astype(np.float32) * 0.05
        dn = rng.standard_normal((D, I)).astype(np.float32) * 0.05
        if bits == 32:
            experts.append({"gate_up": (gu, None, None), "down": (dn, None, None), "ref": (gu, dn)})
            continue
        parts, ref = {}, []
        for name, w in (("gate_up", gu), ("down", dn)):
            q, d, z = quantize_rows(w, bits, block, scheme)
            parts[name] = (np.ascontiguousarray(pack(q, bits)), d, z)
            ref.append(dequantize_rows(q, d, bits, block, w.shape[1], z))
        parts["ref"] = tuple(ref)
        experts.append(parts)
    return experts


def numpy_moe(experts, x, ids, weights, block):
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot, g in sorted(zip(ids[t], weights[t])):
            gu, dn = experts[slot]["ref"]
            xt = quantize_activations(x[t], block) if block else x[t]
            h = gu @ xt
            inter = h.shape[0] // 2
            act = h[:inter] / (1 + np.exp(-h[:inter])) * h[inter:]
            if block:
                act = quantize_activations(act, block)
            out[t] += g * (dn @ act)
    return out


def kernel_moe(kernel, experts, x, ids, weights, bits, block, round_act, residual=None):
    slots = np.unique(ids)
    rows = [np.nonzero(ids == s) for s in slots]
    tok_start = np.zeros(len(slots) + 1, np.int32)
    tok_start[1:] = np.cumsum([len(r) for r, _ in rows])
    tok_index = np.concatenate([r for r, _ in rows]).astype(np.int32)
    tok_weight = np.concatenate([weights[r, c] for r, c in rows]).astype(np.float32)
    table = np.array([[native.address(a) for a in (*experts[s]["gate_up"], *experts[s]["down"])] for s in slots],
                     np.uint64)
    out = np.empty_like(x)
    I = experts[0]["ref"][1].shape[1]
    return kernel.moe(bits, round_act, block, x, residual, out, table, tok_start, tok_index, tok_weight, I)


CASES = [(4, 32, "absmax"), (8, 32, "absmax"), (4, 64, "asymmetric"), (8, 128, "symmetric"), (4, 32, "asymmetric")]


@pytest.mark.parametrize("bits,block,scheme", CASES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_quantized_experts_match_numpy(bits, block, scheme, tokens):
    kernel = native.ExpertKernel(kernel_or_skip(), threads=2)
    rng = np.random.default_rng(bits * 100 + block + tokens)
    E, D, I, k = 8, 256, 192, 3
    experts = make_experts(rng, E, D, I, bits, block, scheme)
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, k)).astype(np.float32)
    residual = rng.standard_normal((tokens, D)).astype(np.float32)
    got = kernel_moe(kernel, experts, x, ids, weights, bits, block, True, residual)
    want = residual + numpy_moe(experts, x, ids, weights, block)
    scale = np.abs(want - residual).max()
    assert np.abs(got - want).max() <= 2e-5 * scale + 1e-6, np.abs(got - want).max() / scale


@pytest.mark.parametrize("bits", [32, 4, 8])
def test_fp32_activations_match_numpy(bits):
    """fp32 experts, and quantized experts whose bundle keeps activations fp32."""
    kernel = native.ExpertKernel(kernel_or_skip(), threads=3)
    rng = np.random.default_rng(bits)
    E, D, I, k = 6, 160, 96, 2
    experts = make_experts(rng, E, D, I, bits, 32, "absmax")
    x = rng.standard_normal((3, D)).astype(np.float32)
    ids = np.array([[0, 5], [5, 2], [1, 0]])
    weights = rng.random((3, k)).astype(np.float32)
    got = kernel_moe(kernel, experts, x, ids, weights, bits, 32, False)
    want = numpy_moe(experts, x, ids, weights, None)
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


def test_fp32_prompt_token_groups_match_numpy():
    """A prompt's routing: experts with 1 to 15+ tokens, so fp32 rows run every tile (3-7 tokens in one
    pass, more split into equal groups, 2 and 1 on their own paths), on odd sizes (K % 8 tails, row
    counts that no tile height divides)."""
    kernel = native.ExpertKernel(kernel_or_skip(), threads=2)
    rng = np.random.default_rng(23)
    E, D, I, k, tokens = 9, 100, 37, 2, 40
    experts = make_experts(rng, E, D, I, 32, 32, "absmax")
    share = np.array([15, 8, 7, 3, 6, 1, 2, 5, 4], np.float64)
    ids = np.stack([rng.choice(E, k, replace=False, p=share / share.sum()) for _ in range(tokens)])
    counts = np.bincount(ids.ravel(), minlength=E)
    assert counts.max() > 7 and set(range(3, 8)) & set(counts.tolist()), counts  # the groups this test is for
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    weights = rng.random((tokens, k)).astype(np.float32)
    residual = rng.standard_normal((tokens, D)).astype(np.float32)
    got = kernel_moe(kernel, experts, x, ids, weights, 32, 32, False, residual)
    want = residual + numpy_moe(experts, x, ids, weights, None)
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want - residual).max()


def test_thread_count_does_not_change_results():
    """Rows are split across threads, but each output sums its experts in one fixed order."""
    lib = kernel_or_skip()
    rng = np.random.default_rng(7)
    experts = make_experts(rng, 8, 256, 128, 4, 32, "absmax")
    x = rng.standard_normal((2, 256)).astype(np.float32)
    ids = np.array([[1, 4, 6], [4, 0, 2]])
    weights = rng.random((2, 3)).astype(np.float32)
    outs = [kernel_moe(native.ExpertKernel(lib, threads=n), experts, x, ids, weights, 4, 32, True) for n in (1, 2, 4)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_portable_path_matches(tmp_path):
    """The C path every Arm or older x86 build takes (no AVX2/NEON intrinsics), built here."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the portable kernel path")
    lib_path = tmp_path / "experts_portable.so"
    subprocess.run([cc, "-O2", "-std=c11", "-pthread", "-shared", "-fPIC", "-DDSX_PORTABLE",
                    str(ROOT / "runtime" / "native" / "experts.c"), "-o", str(lib_path), "-lm"], check=True)
    lib = ctypes.CDLL(str(lib_path))
    assert lib.dsx_simd() == 0
    lib.dsx_pool_create.restype = ctypes.c_void_p
    lib.dsx_pool_create.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.dsx_pool_destroy.argtypes = [ctypes.c_void_p]
    lib.dsx_moe.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    kernel = native.ExpertKernel(lib, threads=2)
    rng = np.random.default_rng(11)
    for bits, scheme in ((4, "absmax"), (8, "asymmetric")):
        experts = make_experts(rng, 6, 128, 64, bits, 32, scheme)
        x = rng.standard_normal((2, 128)).astype(np.float32)
        ids = np.array([[0, 3], [3, 5]])
        weights = rng.random((2, 2)).astype(np.float32)
        got = kernel_moe(kernel, experts, x, ids, weights, bits, 32, True)
        want = numpy_moe(experts, x, ids, weights, 32)
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()


def test_bad_arguments_are_refused():
    kernel = native.ExpertKernel(kernel_or_skip(), threads=1)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(RuntimeError, match="bad arguments"):
        kernel.moe(5, True, 32, x, None, np.empty_like(x), np.zeros((0, 6), np.uint64), np.zeros(1, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, np.float32), 32)


def test_switch_to_numpy(monkeypatch):
    monkeypatch.setenv(native.ENV, "numpy")
    assert native.load() is None
    assert native.status() == {"routed_experts": "numpy", "reason": f"{native.ENV}=numpy"}


def test_the_install_built_the_kernel_where_a_compiler_exists():
    """setup.py builds the kernel as an optional extension: a compile error would otherwise only
    show as a slower paged backend. Here (Linux, cc present) it must have been built."""
    import os

    if not sys.platform.startswith("linux") or shutil.which("cc") is None or os.environ.get("DSEXPORT_NATIVE") == "0":
        pytest.skip("no C compiler here: the runtime falls back to numpy")
    if os.environ.get(native.ENV) == "numpy":
        pytest.skip(f"{native.ENV}=numpy")
    assert native.load() is not None, native.status()
    assert native.status()["routed_experts"] == "native"
