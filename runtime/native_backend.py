"""The native backend: a CPU bundle's whole decoder step in C (runtime/native/decoder.c).

The bundle's `native` section (exporter/native_index.py) says where each weight lies in the
graphs' data files; the routed experts come from a paged bundle's expert store, or from a fused
bundle's MoE / QMoE initializers (de-interleaved and un-sharded here into the store's layout).
Everything is read into memory at load, once: fp32 MatMul weights transposed to rows, MatMulNBits
rows and the experts. No ONNX Runtime session is opened, so the weights are held once.

Chosen when the kernel library is built, the bundle has a native section and (paged bundles)
every routed expert fits the cache budget (the default); otherwise ONNX Runtime runs the graphs
(runtime/backends.native_unavailable says why). DSEXPORT_DECODER=onnxruntime forces ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import os
import time
import types

import numpy as np

from dsexport.core.errors import BundleError, NumericalError, UserError
from dsexport.core.sections import NativeLinear, NativeRouted, TensorRef

from . import native
from .backends import LoadOptions
from .bundle import Bundle
from .paged_backend import expert_addresses, kernel_layout
from .paging import DEFAULT_POLICY, ExpertCache, ExpertStore, PagingStats


class Linear(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("block", ctypes.c_int32), ("rows", ctypes.c_int32), ("K", ctypes.c_int32),
                ("round_act", ctypes.c_int32), ("panel", ctypes.c_int32), ("w", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("qkv", Linear), ("q_a_norm", ctypes.c_void_p), ("q_b", Linear),
                ("kv_norm", ctypes.c_void_p), ("w_uk", ctypes.c_void_p), ("w_uv", ctypes.c_void_p),
                ("o_proj", Linear), ("mlp_norm", ctypes.c_void_p), ("gate_up", Linear), ("down", Linear),
                ("router", ctypes.c_void_p), ("router_bias", ctypes.c_void_p), ("groups", ctypes.c_void_p),
                ("experts", ctypes.c_void_p)] + [(n, ctypes.c_int32) for n in (
                    "E", "expert_I", "expert_bits", "expert_block", "expert_round_act", "expert_panel", "w_half")]


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in (
        "n_layers", "D", "H", "dn", "dr", "dv", "r", "qr", "vocab", "k", "n_group", "topk_group", "sigmoid",
        "group_top2", "norm_topk", "reserved")] + [(n, ctypes.c_float) for n in (
            "routed_scale", "eps", "latent_eps", "rope_scale")] + [
        ("inv_freq", ctypes.c_void_p), ("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("head", Linear),
        ("layers", ctypes.c_void_p), ("eh_proj", Linear), ("enorm", ctypes.c_void_p), ("hnorm", ctypes.c_void_p)]


class Step(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("B", "T", "past", "capacity")] + [
        (n, ctypes.c_void_p) for n in ("ids", "positions", "mask", "cache", "logits", "hidden", "routed", "profile")] + [
        ("last_only", ctypes.c_int32), ("reserved", ctypes.c_int32), ("hidden_in", ctypes.c_void_p)]


PROFILE_PARTS = ("projections", "attention", "routed experts", "head", "serial")  # decoder.c's PROFILE_*


_ERRORS = {-1: "bad arguments", -2: "out of memory", -3: "a token id outside the vocabulary"}


LAYOUT_VERSION = 7  # decoder.c's DSX_LAYOUT_VERSION: W_UK in 64-column blocks, block-32 rows as panels, last_only,
# the MTP block's input (eh_proj, hidden_in), panels with fp16 scales (panel 2), fp16 W_UK/W_UV (w_half), 6-bit panels


def half_scales(scales: np.ndarray) -> np.ndarray | None:
    """Panel scales as fp16 when every one is an fp16 value (the exporter rounds block scales to
    fp16 values: core/quant.py), to within float32 rounding (a fused MoE op's down scales come
    back divided by its fold); None otherwise, and the panels keep float scales."""
    half = scales.astype(np.float16)
    if not np.all(np.abs(half.astype(np.float32) - scales) <= np.abs(scales) * np.float32(2.0 ** -20)):
        return None
    return half


def fits_six_bits(q: np.ndarray) -> bool:
    """Whether MatMulNBits 8-bit weights (q - 128) all lie in [-32, 31]: a 6-bit quantization
    stored in the 8-bit form (core/quant.py storage_bits), which 6-bit panels hold at 0.75 bytes."""
    return bool(q.size) and int(q.min()) >= 96 and int(q.max()) <= 159


def blocked_w_uk(a: np.ndarray) -> np.ndarray:
    """W_UK [H, dn, r] as [H, r/64, dn, 64] when 64 divides r (decoder.c reads 64 columns at a
    time: each block contiguous), else as it is."""
    if a.shape[2] % 64:
        return a
    H, dn, r = a.shape
    return np.ascontiguousarray(a.reshape(H, dn, r // 64, 64).transpose(0, 2, 1, 3))


def check_abi(lib) -> None:
    """The C structures' sizes and weight layouts are this module's (a library from another build
    would read the weights wrongly rather than fail)."""
    sizes = (ctypes.c_int64 * 5)()
    lib.dsx_decoder_abi(sizes, 5)
    mine = [ctypes.sizeof(t) for t in (Linear, Layer, Model, Step)] + [LAYOUT_VERSION]
    if list(sizes) != mine:
        raise native.LibraryMismatch(f"the native library's structures and layouts ({list(sizes)}) differ from this "
                                     f"runtime's ({mine}): reinstall dsexport so the library is rebuilt")


def finite(a: np.ndarray) -> bool:
    """No NaN or Inf in a: min and max propagate NaN and show an infinity, in two passes without a
    temporary the size of a (np.isfinite(a).all() made one and took most of a large bundle's load)."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing). The
    weights are many arrays of a few MB, which glibc serves from its heap once an earlier free
    raised its mmap threshold; freed, they stay in the process: a build that loads the native
    decoder and then ONNX Runtime held both (checkpoint M fp32: 9.8 GB peak instead of 5.3)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LatentCache(list):
    """Per layer [B, S, L] views of buffers with room to grow; forward writes new positions in place
    and returns a new LatentCache over the same buffers (a truncated one reuses them too)."""

    def __init__(self, buffers: list[np.ndarray], length: int, pointers=None):
        super().__init__(buf[:, :length] for buf in buffers)
        self.buffers, self.length = buffers, length
        # the buffers' addresses as decoder.c takes them, made once per set of buffers
        self.pointers = pointers or (ctypes.c_void_p * len(buffers))(*[native.address(b) for b in buffers])


class NativeBackend:
    name = "native"
    has_hidden_states = True  # decoder.c writes the final-normed states the MTP graph reads

    def __init__(self, bundle: Bundle, options: LoadOptions):
        manifest, section = bundle.manifest, bundle.manifest.native
        cfg = self.cfg = manifest.model
        self.num_layers, self.latent_dim, self.k = cfg.num_hidden_layers, cfg.latent_dim, cfg.num_experts_per_tok
        self.lib = native.load()
        check_abi(self.lib)
        self.lib.dsx_pack_panels.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4
        self.lib.dsx_pack_panels.restype = ctypes.c_int
        # the AVX2 build reads block-32 rows as 8-row panels (dsx.h); DSEXPORT_NATIVE_PANELS=0 keeps rows (A/B runs)
        self.panels = self.lib.dsx_simd() == 1 and os.environ.get("DSEXPORT_NATIVE_PANELS", "1") != "0"
        # panels hold fp16 scales where the bundle's are fp16 values; DSEXPORT_NATIVE_HALF_SCALES=0 keeps float (A/B)
        self.lib.dsx_half_scales.restype = ctypes.c_int
        self.half = self.panels and self.lib.dsx_half_scales() == 1 and \
            os.environ.get("DSEXPORT_NATIVE_HALF_SCALES", "1") != "0"
        # 8-bit projections whose values fit 6 bits (a 6-bit head, core/quant.py) as 6-bit panels;
        # DSEXPORT_NATIVE_SIX_BITS=0 keeps them 8-bit (A/B runs)
        self.six = os.environ.get("DSEXPORT_NATIVE_SIX_BITS", "1") != "0"
        self.resident_bytes = 0
        self.cfg_precision = manifest.precision
        self._keep: list = []  # every array whose address the structures hold
        self._addresses: dict = {}  # fp32 tensors read, by location
        self._files: dict[str, tuple[int, int]] = {}
        try:
            self.model, self.layers = self._build(bundle, section)
        except BaseException:
            if getattr(self, "store", None) is not None:
                self.store.close()
            raise
        finally:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()
        self.kernel = native.ExpertKernel(self.lib, options.threads)
        self.lib.dsx_decoder_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.dsx_decoder_forward.restype = ctypes.c_int
        self.lib.dsx_decoder_greedy.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + \
            [ctypes.c_void_p] * 2
        self.lib.dsx_decoder_greedy.restype = ctypes.c_int
        if os.environ.get("DSEXPORT_NATIVE_GREEDY_LOOP", "1") == "0":  # the Python loop, step by step (A/B runs)
            self.greedy = None
        self.step = Step()
        self._routed: list = []  # (expert slots [layers, N, k], tokens, phase) of steps not yet counted
        self.profile: dict | None = None

    # ---- loading ------------------------------------------------------------------------
    def _open(self, bundle: Bundle, ref: TensorRef) -> int:
        """The open file ref lies in, its bytes checked to lie inside it (a manifest is untrusted input)."""
        if ref.file not in self._files:
            path = bundle.path(ref.file, "native")
            fd = os.open(path, os.O_RDONLY)
            self._files[ref.file] = (fd, os.fstat(fd).st_size)
        fd, size = self._files[ref.file]
        if ref.offset + ref.bytes > size:
            raise BundleError(f"native: {ref.file} holds {size} bytes; a tensor at {ref.offset} + {ref.bytes} lies "
                              "outside it")
        return fd

    def _read(self, bundle: Bundle, ref: TensorRef) -> np.ndarray:
        """The bytes ref names, read into memory."""
        fd = self._open(bundle, ref)
        buf = np.empty(ref.bytes, np.uint8)
        done, view = 0, memoryview(buf)
        while done < ref.bytes:  # one read returns at most ~2 GB on Linux
            n = os.preadv(fd, [view[done:]], ref.offset + done)
            if n <= 0:
                raise BundleError(f"native: short read from {ref.file}")
            done += n
        return buf.view(np.float32 if ref.dtype == "float32" else np.uint8).reshape(ref.shape)

    def _map(self, bundle: Bundle, ref: TensorRef) -> np.ndarray:
        """The bytes ref names, mapped read-only (checked against the file like _read): for tensors
        copied once into another layout, which then need no buffer of their own."""
        fd = self._open(bundle, ref)
        with os.fdopen(os.dup(fd), "rb") as f:  # the file already opened and checked, not its name again
            mapped = np.memmap(f, np.float32 if ref.dtype == "float32" else np.uint8, "r", ref.offset, ref.shape)
        return mapped

    def _f32(self, bundle: Bundle, ref: TensorRef | None, blocked: bool = False) -> int:
        """A float32 tensor's address; blocked: W_UK [H, dn, r] as [H, r/64, dn, 64] when 64 divides r
        (decoder.c reads 64 columns at a time: each block contiguous)."""
        if ref is None:
            return 0
        key = (ref.file, ref.offset, ref.bytes, blocked)
        if key in self._addresses:  # a head tied to the embedding: one copy
            return self._addresses[key]
        a = self._read(bundle, ref)
        if not finite(a):
            raise BundleError(f"native: a tensor in {ref.file} at {ref.offset} holds NaN or Inf")
        if blocked:
            a = blocked_w_uk(a)
        self._keep.append(a)
        self._addresses[key] = native.address(a)
        return self._addresses[key]

    def _halve(self, packed: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list, int]:
        """Panels [(q, float scales)] of one matrix or one layer's experts, with fp16 scales where
        all of them are fp16 values, and decoder.c's panel flag (1 float scales, 2 fp16)."""
        halves = [half_scales(ps) for _, ps in packed] if self.half else [None]
        if any(h is None for h in halves):
            return packed, 1
        return [(pq, h) for (pq, _), h in zip(packed, halves)], 2

    def _absorbed(self, bundle: Bundle, w_uk: TensorRef, w_uv: TensorRef) -> tuple[int, int, int]:
        """W_UK (blocked as _f32 does) and W_UV, as fp16 when both hold only fp16 values (a quantized
        bundle's absorbed="fp16": core/quant.py): the same products, half the bytes. Addresses and
        decoder.c's w_half."""
        if not self.half:
            return self._f32(bundle, w_uk, blocked=True), self._f32(bundle, w_uv), 0
        arrays = [self._read(bundle, w_uk), self._read(bundle, w_uv)]
        if not all(finite(a) for a in arrays):
            raise BundleError(f"native: W_UK or W_UV (in {w_uk.file}, {w_uv.file}) holds NaN or Inf")
        arrays[0] = blocked_w_uk(arrays[0])
        halves = [a.astype(np.float16) for a in arrays]
        if all(np.array_equal(h.astype(np.float32), a) for h, a in zip(halves, arrays)):
            arrays, flag = halves, 1
        else:
            flag = 0
        self._keep += arrays
        return native.address(arrays[0]), native.address(arrays[1]), flag

    def _pack(self, bits: int, rows: int, q: np.ndarray, scales: np.ndarray, to_bits: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Block-32 rows as 8-row panels (runtime/native/dsx.h); the rows' own arrays can then go.
        to_bits 6: 8-bit rows whose values all fit 6 bits, as 6-bit panels."""
        q = np.ascontiguousarray(q).reshape(rows, -1)
        kp = q.shape[1] * 8 // bits
        bits = to_bits or bits
        padded = -(-rows // 8) * 8
        pq = np.empty((padded, kp * bits // 8), np.uint8)
        ps = np.empty(padded * (kp // 32), np.float32)
        if self.lib.dsx_pack_panels(bits, rows, kp, native.address(q), native.address(np.ascontiguousarray(scales)),
                                    native.address(pq), native.address(ps)):
            raise BundleError(f"native: {rows} x {kp} {bits}-bit rows cannot be packed")
        return pq, ps

    def _linear(self, bundle: Bundle, lin: NativeLinear | None) -> Linear:
        if lin is None:
            return Linear()
        round_act, panel = int(lin.bits != 32 and lin.activations == "int8"), 0
        if lin.bits == 32 and lin.layout == "rows":  # already [rows, cols]: the embedding, read once
            return Linear(32, 0, lin.rows, lin.cols, 0, 0, self._f32(bundle, lin.weight), 0, self._f32(bundle, lin.bias))
        if lin.bits == 32:  # the MatMul weight [cols, total]: rows as [rows, cols]
            w = np.ascontiguousarray(self._read(bundle, lin.weight)[:, lin.col_start:lin.col_start + lin.rows].T)
            scales = None
        else:
            w = self._read(bundle, lin.weight)
            scales = self._read(bundle, lin.scales)
        for a in (w, scales):
            if a is not None and a.dtype == np.float32 and not finite(a):
                raise BundleError("native: a projection's weights hold NaN or Inf")
        bits = lin.bits
        if self.panels and round_act and lin.block == 32:
            bits = 6 if bits == 8 and self.six and fits_six_bits(w) else bits
            [(w, scales)], panel = self._halve([self._pack(lin.bits, lin.rows, w, scales, bits)])
        self._keep += [w, scales]
        return Linear(bits, lin.block or 0, lin.rows, lin.cols, round_act, panel, native.address(w),
                      native.address(scales), self._f32(bundle, lin.bias))

    def _experts(self, store: ExpertStore, layer: int, layout: tuple[int, bool, int]) -> tuple[np.ndarray, int]:
        """[E, 6] addresses of the layer's experts, read once (packed into panels where the kernel
        takes them: the records' own buffers are then dropped), and decoder.c's panel flag (0 rows,
        1 panels with float scales, 2 with fp16 scales)."""
        bits, round_act, block = layout
        entry = store.layers[layer]
        pack = self.panels and bits != 32 and round_act and block == 32
        table = np.zeros((entry.experts, 6), np.uint64)
        packed = []  # [(pq, ps)] gate_up then down per slot, with fp16 scales or not as one layer
        for slot in range(entry.experts):
            expert = store.read(layer, slot)
            values = [expert.w_gate_up, expert.w_down] if expert.q is None else \
                [part[2] for part in expert.q.parts.values()]  # fp32 weights, or the scales
            if not all(finite(v) for v in values):
                raise BundleError(f"layer {layer}, expert slot {slot} of the expert store holds NaN or Inf: the "
                                  "bundle's weights are corrupt")
            if not pack:
                self._keep.append(expert)
                table[slot] = expert_addresses(expert)
                self.resident_bytes += expert.nbytes
                continue
            for name in ("gate_up", "down"):
                m, q, scales, _ = expert.q.parts[name]
                packed.append(self._pack(bits, m["rows"], q, scales))
        if not pack:
            return table, 0
        packed, panel = self._halve(packed)
        for i, (pq, ps) in enumerate(packed):
            slot, k = divmod(i, 2)
            self._keep += [pq, ps]
            table[slot, 3 * k], table[slot, 3 * k + 1] = native.address(pq), native.address(ps)
            self.resident_bytes += pq.nbytes + ps.nbytes
        return table, panel

    def _fused_experts(self, bundle: Bundle, routed: NativeRouted, E: int) -> tuple[np.ndarray, int]:
        """[E, 6] addresses of a fused bundle's experts in the store's layout: gate rows then up rows
        [2I, K] (the op holds them interleaved g0,u0,g1,.. per shard), down [D, I] (the shards'
        columns side by side), down's scales (or fp32 weights) divided by the op's fold."""
        S, fold = routed.shards, np.float32(routed.fold)
        fc1, fc2 = self._map(bundle, routed.fc1), self._map(bundle, routed.fc2)  # copied per expert below
        s1 = self._map(bundle, routed.fc1_scales) if routed.fc1_scales else None
        s2 = self._map(bundle, routed.fc2_scales) if routed.fc2_scales else None
        for a in (fc1, fc2) if routed.bits == 32 else (s1, s2):
            if not finite(a):
                raise BundleError("native: a fused MoE op's expert weights hold NaN or Inf: the bundle's weights are "
                                  "corrupt")

        def gate_up(a: np.ndarray, e: int) -> np.ndarray:  # [S*E, 2p, X] -> expert e's [2I, X]
            p, X = a.shape[1] // 2, a.shape[2]
            out = np.empty((2, S, p, X), a.dtype)  # gate rows then up rows, shard by shard
            np.copyto(out, a.reshape(S, E, p, 2, X)[:, e].transpose(2, 0, 1, 3))
            return out.reshape(2 * S * p, X)

        def down(a: np.ndarray, e: int) -> np.ndarray:  # [S*E, D, X] -> expert e's [D, S*X]
            D, X = a.shape[1], a.shape[2]
            out = np.empty((D, S, X), a.dtype)
            np.copyto(out, a.reshape(S, E, D, X)[:, e].transpose(1, 0, 2))
            return out.reshape(D, S * X)

        def unfold(a: np.ndarray) -> np.ndarray:  # down's scales (or fp32 weights) without the op's fold
            np.divide(a, fold, out=a)
            return a

        pack = self.panels and routed.bits != 32 and routed.activations == "int8" and routed.block == 32
        table = np.zeros((E, 6), np.uint64)
        experts = []
        for e in range(E):
            if routed.bits == 32:
                experts += [(gate_up(fc1, e), None), (unfold(down(fc2, e)), None)]
            else:
                q1, d1 = gate_up(fc1, e), gate_up(s1, e).reshape(-1)
                q2, d2 = down(fc2, e), unfold(down(s2, e)).reshape(-1)
                experts += [self._pack(routed.bits, q1.shape[0], q1, d1), self._pack(routed.bits, q2.shape[0], q2, d2)] \
                    if pack else [(q1, d1), (q2, d2)]
        panel = 0
        if pack:  # fp16 scales where the whole layer's are fp16 values
            experts, panel = self._halve(experts)
        for e in range(E):
            (q1, d1), (q2, d2) = experts[2 * e], experts[2 * e + 1]
            parts = [q1, d1, None, q2, d2, None]
            self._keep += [a for a in parts if a is not None]
            self.resident_bytes += sum(a.nbytes for a in parts if a is not None)
            table[e] = [native.address(a) for a in parts]
        return table, panel

    def _fused_router(self, bundle: Bundle, routed: NativeRouted, E: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The router [E, D] (the MatMul weight's columns router_col..) and the correction bias [E]."""
        w = self._read(bundle, routed.router)
        router = np.ascontiguousarray(w[:, routed.router_col:routed.router_col + E].T)
        return router, (self._read(bundle, routed.bias) if routed.bias else None)

    def _build(self, bundle: Bundle, section) -> tuple[Model, ctypes.Array]:
        cfg = self.cfg
        paging, store, layout = bundle.manifest.paging, None, None
        if paging is not None:
            store = self.store = ExpertStore(bundle.path(paging.file, "paging.file"), paging, holds="quantized")
            layout = kernel_layout(store)
            if layout is None:
                raise BundleError("native: the expert store's layout is not one the kernel reads")
            layers = sorted(store.layers)
            self.stats_counters = PagingStats(layers, {i: store.layers[i].experts for i in layers})
            total = sum(store.expert_bytes(i) * entry.experts for i, entry in store.layers.items())
            self.cache = ExpertCache(store, total, DEFAULT_POLICY, False, self.stats_counters)
        else:
            layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
            self.stats_counters = PagingStats(layers, {i: cfg.num_experts(i) for i in layers})
            self.cache = None
        table = (Layer * cfg.num_hidden_layers)()
        for i in range(cfg.num_hidden_layers):
            self._layer(bundle, table[i], i, section.layers[i], store, layout)
        self.stats_counters.reset()
        g = section.globals
        m = self._model(cfg.num_hidden_layers, section)
        m.inv_freq, m.embed = self._f32(bundle, g["inv_freq"]), self._f32(bundle, g["embed"])
        m.final_norm, m.head = self._f32(bundle, g["final_norm"]), self._linear(bundle, g["head"])
        m.layers = ctypes.addressof(table)
        self.mtp_model = self._draft_head = None
        if section.mtp is not None:  # the MTP block: its layer, input norms, eh_proj; the decoder's embedding and head
            mtp = section.mtp
            self.mtp_layer = (Layer * 1)()
            self._layer(bundle, self.mtp_layer[0], cfg.num_hidden_layers, mtp.layer, None, None)
            mm = self.mtp_model = self._model(1, section)
            mm.inv_freq, mm.embed, mm.head = m.inv_freq, m.embed, m.head
            mm.final_norm, mm.layers = self._f32(bundle, mtp.norm), ctypes.addressof(self.mtp_layer)
            mm.eh_proj = self._linear(bundle, mtp.eh_proj)
            mm.enorm, mm.hnorm = self._f32(bundle, mtp.enorm), self._f32(bundle, mtp.hnorm)
        return m, table

    def _model(self, n_layers: int, section) -> Model:
        cfg = self.cfg
        return Model(n_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.qk_nope_head_dim,
                     cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank or 0, cfg.vocab_size,
                     cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, int(cfg.scoring_func == "sigmoid"),
                     int(cfg.topk_method == "noaux_tc"), int(cfg.norm_topk_prob), 0, cfg.routed_scaling_factor,
                     cfg.rms_norm_eps, section.latent_eps, section.rope_scale)

    def _layer(self, bundle: Bundle, ly: Layer, i: int, layer, store, layout) -> None:
        """Fill ly with layer i's weights (a decoder layer, or the MTP block's at num_hidden_layers)."""
        cfg, roles = self.cfg, layer.roles
        ly.attn_norm, ly.kv_norm = self._f32(bundle, roles["attn_norm"]), self._f32(bundle, roles["kv_norm"])
        ly.w_uk, ly.w_uv, ly.w_half = self._absorbed(bundle, roles["w_uk"], roles["w_uv"])
        ly.mlp_norm, ly.q_a_norm = self._f32(bundle, roles["mlp_norm"]), self._f32(bundle, roles.get("q_a_norm"))
        for role in ("qkv", "q_b", "o_proj", "gate_up", "down"):
            setattr(ly, role, self._linear(bundle, roles.get(role)))
        routed = layer.routed
        if store is not None and i in store.layers:
            entry = store.layers[i]
            router, bias = store.router(i)
            groups = np.asarray(entry.groups or [e // cfg.group_size for e in range(entry.experts)], np.int32)
            experts, ly.expert_panel = self._experts(store, i, layout)
            E, bits, round_act, block = entry.experts, *layout
        elif routed is not None:
            E = cfg.num_experts(i)
            router, bias = self._fused_router(bundle, routed, E)
            groups = np.asarray(routed.groups, np.int32)
            experts, ly.expert_panel = self._fused_experts(bundle, routed, E)
            bits, round_act, block = routed.bits, routed.activations == "int8", routed.block or 0
        else:
            return
        router = np.ascontiguousarray(router, np.float32)
        bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        if not all(finite(a) for a in (router, bias) if a is not None):
            raise BundleError(f"layer {i}'s router holds NaN or Inf")
        self._keep += [router, bias, groups, experts]
        ly.router, ly.router_bias = native.address(router), native.address(bias)
        ly.groups, ly.experts = native.address(groups), native.address(experts)
        ly.E, ly.expert_I = E, cfg.moe_intermediate_size
        ly.expert_bits, ly.expert_block, ly.expert_round_act = bits, block, int(round_act)

    @classmethod
    def load(cls, bundle: Bundle, options: LoadOptions) -> "NativeBackend":
        return cls(bundle, options)

    # ---- the engine's backend interface ---------------------------------------------------
    def empty_cache(self, batch: int) -> LatentCache:
        return LatentCache([np.zeros((batch, 64, self.latent_dim), np.float32) for _ in range(self.num_layers)], 0)

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [np.array(c) for c in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> LatentCache:
        length = arrays[0].shape[1] if arrays else 0
        buffers = []
        for a in arrays:
            buf = np.zeros((a.shape[0], max(64, 2 * length), self.latent_dim), np.float32)
            buf[:, :length] = a
            buffers.append(buf)
        return LatentCache(buffers, length)

    def truncate(self, cache: LatentCache, length: int) -> LatentCache:
        return LatentCache(cache.buffers, min(length, cache.length), cache.pointers)

    def _room(self, cache: list, batch: int, need: int) -> LatentCache:
        if not isinstance(cache, LatentCache):
            cache = self.cache_from_host([np.asarray(c, np.float32) for c in cache])
        if len(cache.buffers) != self.num_layers or cache.buffers[0].shape[0] != batch:
            raise BundleError(f"native: a cache of {len(cache.buffers)} layers x {cache.buffers[0].shape[0]} rows for "
                              f"a batch of {batch}")
        if cache.buffers[0].shape[1] < need:
            grown = []
            for buf in cache.buffers:
                new = np.zeros((batch, max(need, 2 * buf.shape[1]), self.latent_dim), np.float32)
                new[:, :cache.length] = buf[:, :cache.length]
                grown.append(new)
            cache = LatentCache(grown, cache.length)
        return cache

    def forward_last(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                     cache: list) -> tuple[np.ndarray, LatentCache]:
        """forward() that returns only each row's last logits [B, 1, V] (a prompt: the head skips the rest)."""
        return self.forward(input_ids, position_ids, attention_mask, cache, last_only=True)

    def forward_hidden(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                       cache: list) -> tuple[np.ndarray, np.ndarray, LatentCache]:
        """logits [B, T, V], the final-normed hidden states [B, T, D] (the MTP graph's input), the cache."""
        hidden = np.empty((*input_ids.shape, self.cfg.hidden_size), np.float32)
        logits, cache = self.forward(input_ids, position_ids, attention_mask, cache, hidden=hidden)
        return logits, hidden, cache

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list, last_only: bool = False, hidden: np.ndarray | None = None) -> tuple[np.ndarray, LatentCache]:
        B, T = input_ids.shape
        past = cache.length if isinstance(cache, LatentCache) else (cache[0].shape[1] if cache else 0)
        if attention_mask.shape != (B, past + T) or position_ids.shape != (B, T):
            raise BundleError(f"native: mask {attention_mask.shape} and positions {position_ids.shape} for {B} x {T} "
                              f"new tokens after {past}")
        cache = self._room(cache, B, past + T)
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        mask = np.ascontiguousarray(attention_mask, np.int64)
        logits = np.empty((B, 1 if last_only else T, self.cfg.vocab_size), np.float32)
        routed = np.empty((self.num_layers, B * T, self.k), np.int32)
        s = self.step
        s.B, s.T, s.past, s.capacity = B, T, past, cache.buffers[0].shape[1]
        s.ids, s.positions, s.mask = native.address(ids), native.address(pos), native.address(mask)
        s.cache, s.logits, s.hidden = ctypes.addressof(cache.pointers), native.address(logits), \
            None if hidden is None else native.address(hidden)
        s.routed, s.last_only = native.address(routed), int(last_only)
        rc = self._profiled(self.lib.dsx_decoder_forward, ctypes.byref(s))
        if rc:
            raise BundleError(f"the native decoder failed: {_ERRORS.get(rc, rc)}")
        self._routed.append((routed, B * T, "prefill" if T > 1 else "decode"))
        if len(self._routed) >= 256:
            self._count()
        return logits, LatentCache(cache.buffers, past + T, cache.pointers)

    def _profiled(self, fn, step_ref, *args) -> int:
        """fn(pool, model, step, *args), its C parts and its time added to self.profile when profiling."""
        parts = np.zeros(len(PROFILE_PARTS) + 1, np.float64) if self.profile is not None else None
        self.step.profile = native.address(parts)
        t0 = time.perf_counter()
        rc = fn(self.kernel.pool, ctypes.byref(self.model), step_ref, *args)
        if self.profile is not None:  # the C parts, and the call as a whole ("native")
            self.profile["native"] = self.profile.get("native", 0.0) + time.perf_counter() - t0
            for name, seconds in zip(PROFILE_PARTS, parts):
                self.profile["native: " + name] = self.profile.get("native: " + name, 0.0) + float(seconds)
        return rc

    def greedy(self, token: int, position: int, cache: list, steps: int, stop_ids) -> tuple[list[int], LatentCache]:
        """Up to `steps` greedy decode steps of one sequence in one C call (decoder.c
        dsx_decoder_greedy): token fed at `position`, each step's argmax fed to the next, stopping
        after a token of stop_ids. The tokens, and the cache with their positions (the last
        token's position is written by the next call, as forward() does)."""
        past = cache.length if isinstance(cache, LatentCache) else (cache[0].shape[1] if cache else 0)
        cache = self._room(cache, 1, past + steps)
        ids, pos = np.array([[token]], np.int64), np.array([[position]], np.int64)
        mask = np.ones((1, past + steps), np.int64)
        logits = np.empty((1, 1, self.cfg.vocab_size), np.float32)
        routed = np.empty((steps, self.num_layers, 1, self.k), np.int32)
        tokens, stop = np.empty(steps, np.int64), np.array(sorted(stop_ids), np.int64)
        s = self.step
        s.B, s.T, s.past, s.capacity = 1, 1, past, cache.buffers[0].shape[1]
        s.ids, s.positions, s.mask = native.address(ids), native.address(pos), native.address(mask)
        s.cache, s.logits, s.hidden, s.last_only = ctypes.addressof(cache.pointers), native.address(logits), None, 0
        rc = self._profiled(self.lib.dsx_decoder_greedy, ctypes.byref(s), steps, native.address(stop), len(stop),
                            native.address(tokens), native.address(routed))
        if rc == -4:
            raise NumericalError("the native decoder produced non-finite logits (NaN/Inf): the bundle's weights are "
                                 "corrupt or a computation overflowed")
        if rc < 1:
            raise BundleError(f"the native decoder failed: {_ERRORS.get(rc, rc)}")
        self._routed += [(routed[i], 1, "decode") for i in range(rc)]
        if len(self._routed) >= 256:
            self._count()
        return tokens[:rc].tolist(), LatentCache(cache.buffers, past + rc, cache.pointers)

    def drafter(self, head: str | None = None) -> "NativeDrafter | None":
        """The MTP block run natively (the bundle's native section locates it), or None.

        head: "bundle" drafts with the bundle's own head; "int8" (the default for an fp32 head,
        DSEXPORT_DRAFT_HEAD overrides) with an int8 copy made here, a quarter of the bytes: a draft
        only proposes a token, which the decoder then checks with the bundle's own weights, so the
        output is unchanged and only the acceptance can move (docs/mtp.md)."""
        if self.mtp_model is None:
            return None
        head = head or os.environ.get("DSEXPORT_DRAFT_HEAD", "int8")
        if head not in ("bundle", "int8"):
            raise UserError(f"DSEXPORT_DRAFT_HEAD or head must be 'bundle' or 'int8', got {head!r}")
        model = self.mtp_model
        if head == "int8" and self.model.head.bits == 32:
            if self._draft_head is None:
                self._draft_head = self._int8_copy(self.model.head)
            model = Model.from_buffer_copy(self.mtp_model)
            model.head = self._draft_head
        return NativeDrafter(self, model)

    def _int8_copy(self, lin: Linear, rows_per_pass: int = 4096) -> Linear:
        """An fp32 projection [rows, K] as int8 rows, blocks of 32 with fp16-valued scales (absmax, as
        the exporter quantizes), int8-rounded activations; packed into panels where the kernel takes them."""
        from dsexport.core.quant import pack, quantize_rows

        rows, K = lin.rows, lin.K
        w = np.ctypeslib.as_array((ctypes.c_float * (rows * K)).from_address(lin.w)).reshape(rows, K)
        nb = -(-K // 32)
        q, scales = np.empty((rows, nb * 32), np.uint8), np.empty((rows, nb), np.float32)
        for r in range(0, rows, rows_per_pass):  # bounded temporaries
            q[r:r + rows_per_pass], scales[r:r + rows_per_pass], _ = quantize_rows(w[r:r + rows_per_pass], 8, 32)
        q, scales, panel = pack(q, 8), scales.reshape(-1), 0
        if self.panels:
            [(q, scales)], panel = self._halve([self._pack(8, rows, q, scales)])
        self._keep += [q, scales]
        return Linear(8, 32, rows, K, 1, panel, native.address(q), native.address(scales), lin.bias)

    def _count(self) -> None:
        """Fold the steps' expert choices into the statistics: per step and MoE layer, each distinct
        expert counts once. Deferred and done for all held steps at once: 256 steps on M took
        23-35 ms with np.unique per step and layer, 1.6-2.3 ms this way."""
        by_phase: dict[str, list] = {}
        for routed, tokens, phase_name in self._routed:
            by_phase.setdefault(phase_name, []).append((routed, tokens))
        self._routed.clear()
        for phase_name, steps in by_phase.items():
            phase = self.stats_counters.phase[phase_name]
            phase["tokens"] += sum(tokens for _, tokens in steps)
            phase["steps"] += len(steps)
            step_of = np.concatenate([np.full(r[0].size, n) for n, (r, _) in enumerate(steps)])  # [pairs]
            for i, hist in self.stats_counters.histogram.items():
                used = np.zeros((len(steps), hist.shape[0]), bool)  # [steps, E]
                used[step_of, np.concatenate([r[i].ravel() for r, _ in steps])] = True
                per_expert = used.sum(axis=0)
                phase["requests"] += int(per_expert.sum())
                phase["hits"] += int(per_expert.sum())
                hist += per_expert

    def stats(self) -> dict:
        self._count()
        # every expert is read once at load and stays: a fused bundle's "cache" is that set
        cache = self.cache or types.SimpleNamespace(
            policy=types.SimpleNamespace(name="resident"), prefetch_enabled=False, entries=(),
            store=types.SimpleNamespace(precision=self.cfg_precision, holds="quantized"), budget=self.resident_bytes,
            used=self.resident_bytes)
        out = self.stats_counters.to_json(cache)
        # every expert is read once at load and stays (no cache in between)
        out.update(resident_bytes=self.resident_bytes, resident_experts=out["total_experts"])
        out["routed_experts"] = f"native decoder ({native.status().get('simd', '?')})"
        out["decoder"] = "native"
        return out

    def reset_stats(self) -> None:
        self._routed.clear()
        self.stats_counters.reset()

    def close(self) -> None:
        if getattr(self, "kernel", None) is not None:
            self.kernel.close()
            self.kernel = None
        if getattr(self, "cache", None) is not None:
            self.cache.close()
            self.cache = None
        if getattr(self, "_keep", None):  # the weights go now, back to the system (not kept by the allocator)
            self.model = self.layers = self.mtp_model = self._draft_head = None
            self._keep.clear()
            self._addresses.clear()
            release_freed_memory()


class NativeDrafter:
    """The MTP block in decoder.c (runtime/speculative.py's drafter interface, as MTPGraph): the
    block's one layer on the backend's thread pool, with the decoder's embedding and head, so a
    draft costs one layer and a head instead of an ONNX Runtime session run (docs/mtp.md)."""

    def __init__(self, backend: NativeBackend, model: Model):
        self.backend, self.model, self.latent_dim = backend, model, backend.latent_dim
        self.step = Step()

    def empty_cache(self, batch: int = 1) -> LatentCache:
        return LatentCache([np.zeros((batch, 64, self.latent_dim), np.float32)], 0)

    def forward(self, hidden: np.ndarray, next_ids: np.ndarray, position_ids: np.ndarray,
                attention_mask: np.ndarray, cache: LatentCache) -> tuple[np.ndarray, LatentCache]:
        """hidden [B, T, D] of tokens t, next_ids [B, T] = tokens t+1, positions of tokens t -> the
        last logits [B, 1, V] (for the token after the last t+1: the draft) and the grown cache."""
        b = self.backend
        B, T = next_ids.shape
        past = cache.length
        if hidden.shape != (B, T, b.cfg.hidden_size) or position_ids.shape != (B, T) or \
                attention_mask.shape != (B, past + T):
            raise BundleError(f"native MTP: hidden {hidden.shape}, positions {position_ids.shape} and mask "
                              f"{attention_mask.shape} for {B} x {T} tokens after {past}")
        buf = cache.buffers[0]
        if buf.shape[1] < past + T:
            grown = np.zeros((B, max(past + T, 2 * buf.shape[1]), self.latent_dim), np.float32)
            grown[:, :past] = buf[:, :past]
            cache = LatentCache([grown], past)
        ids = np.ascontiguousarray(next_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        mask = np.ascontiguousarray(attention_mask, np.int64)
        h = np.ascontiguousarray(hidden, np.float32)
        logits = np.empty((B, 1, b.cfg.vocab_size), np.float32)
        s = self.step
        s.B, s.T, s.past, s.capacity = B, T, past, cache.buffers[0].shape[1]
        s.ids, s.positions, s.mask = native.address(ids), native.address(pos), native.address(mask)
        s.cache, s.logits, s.hidden, s.routed = ctypes.addressof(cache.pointers), native.address(logits), None, None
        s.last_only, s.hidden_in, s.profile = 1, native.address(h), None
        t0 = time.perf_counter()
        rc = b.lib.dsx_decoder_forward(b.kernel.pool, ctypes.byref(self.model), ctypes.byref(s))
        if b.profile is not None:
            b.profile["native: MTP block"] = b.profile.get("native: MTP block", 0.0) + time.perf_counter() - t0
        if rc:
            raise BundleError(f"the native MTP block failed: {_ERRORS.get(rc, rc)}")
        return logits, LatentCache(cache.buffers, past + T, cache.pointers)
