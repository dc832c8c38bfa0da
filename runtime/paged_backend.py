"""The paged backend: the bundle's segment graphs in ONNX Runtime, routed experts from the store.

One forward step runs segment 0, then for each MoE layer i: the routed experts of layer i
(numpy, from the expert cache) added to the segment's residual output, fed as `hidden` to the
next segment; the last segment returns the logits (exporter/paged.py, docs/paging.md).

Prefetch (Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language Models with
Offloading"): as soon as segment i has produced layer i's expert input h, the next MoE layer's
router is applied to h (router and correction bias are resident: E x D floats per layer) and
its top-k experts start loading on a background thread, while layer i's experts and the next
segment's attention run.

Results never depend on the cache: experts are applied in ascending slot order whatever is
resident, and a read returns the same bytes as a hit, so every budget, policy and prefetch
setting gives the same tokens and the same logits.
"""

from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from dsexport.core.config import ModelConfig
from dsexport.core.contract import (HIDDEN, LOGITS, layer_of, moe_input_name, present_name, residual_name,
                                    router_ids_name, router_weights_name)
from dsexport.core.errors import BundleError, NumericalError, UserError

from . import native
from .backends import LoadOptions, token_feed
from .bundle import Bundle
from .paging import DEFAULT_POLICY, Expert, ExpertCache, ExpertStore, PagingStats, quantize_activations
from .sessions import choose_providers, open_session, session_options


_BLAS_THREAD_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                        "scipy_openblas_set_num_threads", "MKL_Set_Num_Threads")


def single_threaded_blas() -> bool:
    """Set numpy's BLAS to one thread (as threadpoolctl does, without the dependency). The experts'
    matmuls are matrix-vector products at decode: OpenBLAS's own threads cost ~8 ms per call to
    wake on a busy 2-core machine (measured), against 0.06 ms for a 4 MB expert matrix on one
    thread, so the backend runs experts on its own threads instead. Process-wide."""
    if not os.path.exists("/proc/self/maps"):
        return False
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "blas" in line.lower() or "mkl_rt" in line.lower()}
    done = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_THREAD_SETTERS:
            if hasattr(lib, name):
                getattr(lib, name)(1)
                done = True
    return done


class PagedBackend:
    name = "onnxruntime-paged"

    def __init__(self, sessions: list, segments: tuple, cache: ExpertCache, cfg: ModelConfig,
                 threads: int | None = None):
        self.sessions, self.segments, self.cache = sessions, segments, cache
        self.stats_counters = cache.stats
        self.num_layers, self.latent_dim = cfg.num_hidden_layers, cfg.latent_dim
        self.k = cfg.num_experts_per_tok
        self.scoring = cfg.scoring_func
        self._inputs = [[i.name for i in s.get_inputs()] for s in sessions]
        self._outputs = [[o.name for o in s.get_outputs()] for s in sessions]
        moe = [s.moe_layer for s in segments if s.moe_layer is not None]
        self.next_moe = dict(zip(moe, moe[1:]))  # layer -> the MoE layer after it
        self.routers = {i: cache.store.router(i) for i in moe[1:]}  # resident: the prefetcher's predictors
        self._total_experts = sum(entry.experts for entry in cache.store.layers.values())
        # routed experts: the native kernel where built and the store's layout suits it, else numpy
        self.kernel, self._workers = None, None
        # numpy's matmuls here (the prefetcher's router) must not wake BLAS threads that then spin
        single_threaded_blas()
        lib = native.load()
        self._tables: dict[int, np.ndarray] = {}  # layer -> [E, 6] expert addresses, when all are resident
        kmax = cfg.num_experts_per_tok
        self._decode_start = {k: np.arange(k + 1, dtype=np.int32) for k in range(1, kmax + 1)}
        self._decode_index = {k: np.zeros(k, np.int32) for k in range(1, kmax + 1)}
        if lib is not None and kernel_layout(cache.store) is not None:
            self.kernel = native.ExpertKernel(lib, threads)
            self._kernel_layout = kernel_layout(cache.store)
            self._preload()
        else:
            self._workers = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1,
                                               thread_name_prefix="dsexport-experts")
        # each segment's inputs, resolved once: (name, kind, past layer)
        self.profile: dict | None = None  # seconds per part of a step, when a benchmark asks (benchmarks/decode.py)
        self._feeds = [[(n, "hidden" if n == HIDDEN else "past" if layer_of(n, "past_latent") is not None else "common",
                         layer_of(n, "past_latent")) for n in names] for names in self._inputs]

    @classmethod
    def load(cls, bundle: Bundle, options: LoadOptions) -> "PagedBackend":
        manifest, paging = bundle.manifest, bundle.manifest.paging
        store = ExpertStore(bundle.path(paging.file, "paging.file"), paging)
        try:
            budget = _budget(store, manifest.model.num_experts_per_tok, options.expert_cache_mb, paging.default_cache_mb)
            # ONNX Runtime's threads would spin after each segment, taking the cores the experts'
            # numpy matmuls (and the prefetch reads) run on next
            providers = choose_providers(manifest, ort.get_available_providers(), bundle.directory)
            sessions = []
            for seg in manifest.graphs.decoder.segments:
                sessions.append(open_session(bundle.path(seg.file, "graphs.decoder.segments"),
                                             session_options(manifest, options.threads, spinning=False), providers,
                                             options.weights, bundle.path(seg.data, "graphs.decoder.segments")))
        except BaseException:
            store.close()
            raise
        layers = sorted(store.layers)
        stats = PagingStats(layers, {i: store.layers[i].experts for i in layers})
        cache = ExpertCache(store, budget, options.cache_policy or DEFAULT_POLICY, options.prefetch, stats)
        return cls(sessions, manifest.graphs.decoder.segments, cache, manifest.model, options.threads)

    # ---- the engine's backend interface ---------------------------------------------------
    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, 0, self.latent_dim), np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in range(self.num_layers)]

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [value.numpy() for value in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32)) for a in arrays]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        B, T = input_ids.shape
        self.cache.phase = "prefill" if T > 1 else "decode"
        self.cache.step += 1
        phase = self.stats_counters.phase[self.cache.phase]
        phase["tokens"] += B * T
        phase["steps"] += 1
        common = {name: ort.OrtValue.ortvalue_from_numpy(a)
                  for name, a in token_feed(input_ids, position_ids, attention_mask).items()}
        present = list(cache)
        hidden = None
        for session, seg, feeds, outputs in zip(self.sessions, self.segments, self._feeds, self._outputs):
            feed = {}
            for name, kind, layer in feeds:
                if kind == "hidden":
                    feed[name] = ort.OrtValue.ortvalue_from_numpy(hidden)
                elif kind == "past":
                    feed[name] = cache[layer]
                else:
                    feed[name] = common[name]
            t0 = time.perf_counter()
            out = dict(zip(outputs, session.run_with_ort_values(outputs, feed)))
            if self.profile is not None:
                self.profile["onnxruntime"] = self.profile.get("onnxruntime", 0.0) + time.perf_counter() - t0
            for i in seg.layers:
                present[i] = out[present_name(i)]
            i = seg.moe_layer
            if i is None:
                return out[LOGITS].numpy(), present
            h = out[moe_input_name(i)].numpy()  # [N, D]
            ids = out[router_ids_name(i)].numpy()  # [N, k]
            weights = out[router_weights_name(i)].numpy()  # [N, k]
            residual = out[residual_name(i)].numpy()  # [B, T, D]
            self._check_segment_outputs(i, h, ids, weights, residual)
            t0 = time.perf_counter()
            if self.kernel is not None:
                hidden = self.routed_native(i, h, ids, weights, residual.reshape(h.shape)).reshape(residual.shape)
            else:
                hidden = residual + self.routed(i, h, ids, weights).reshape(residual.shape)
            if self.profile is not None:
                self.profile["experts"] = self.profile.get("experts", 0.0) + time.perf_counter() - t0
            if not np.isfinite(hidden).all():
                raise NumericalError(f"layer {i} of the paged decoder produced non-finite values (NaN/Inf): the "
                                     "bundle's weights of that layer are corrupt or overflow")
        raise BundleError("the paged decoder has no final segment")

    def _check_segment_outputs(self, layer: int, h, ids, weights, residual) -> None:
        """The segment graph's outputs agree with the store before experts are read with them: the
        native kernel indexes the records by these shapes and slots, without bounds of its own."""
        entry = self.cache.store.layers[layer]
        if (h.ndim != 2 or h.shape[1] != entry.hidden or ids.ndim != 2 or ids.shape[0] != h.shape[0]
                or weights.shape != ids.shape or residual.size != h.size):
            raise BundleError(f"layer {layer}: the segment graph's expert inputs {h.shape}, slots {ids.shape}, weights "
                              f"{weights.shape} and residual {residual.shape} do not match the expert store's hidden "
                              f"size {entry.hidden}")
        if ids.size and (ids.min() < 0 or ids.max() >= entry.experts):
            raise BundleError(f"layer {layer}: the segment graph routed to an expert slot outside 0..{entry.experts - 1}")

    # ---- routed experts -----------------------------------------------------------------
    def routed(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_j weights[:, j] * expert_{ids[:, j]}(h) [N, D], experts applied in ascending slot order."""
        slots = np.unique(ids)
        self.cache.begin_layer(layer, slots.tolist())
        nxt = self.next_moe.get(layer)
        if nxt is not None and self.cache.prefetch_enabled and len(self.cache.entries) < self._total_experts:
            self.cache.prefetch(nxt, self.predict(nxt, h))  # nothing to predict once every expert is resident
        out = np.zeros_like(h)
        try:
            # the main thread reads (or finds) each expert in turn; workers compute them meanwhile
            parts = []
            for slot in slots:
                rows, col = np.nonzero(ids == slot)  # tokens routed to it, and where in their top-k
                expert = self.cache.get(layer, int(slot))
                parts.append((rows, self._workers.submit(_expert_output, expert, h[rows], weights[rows, col],
                                                         self.cache.store.activation_block)))
            for rows, part in parts:  # summed in slot order, whatever finished first
                out[rows] += part.result()
        finally:
            self.cache.end_layer()
        return out

    def _preload(self) -> None:
        """When the cache holds every expert, read them all now (as a fused bundle's weights are read at
        load) and keep each layer's table of addresses: decode then skips the cache's bookkeeping."""
        store = self.cache.store
        total = sum(store.expert_bytes(i) * entry.experts for i, entry in store.layers.items())
        if total > self.cache.budget:
            return
        for i, entry in store.layers.items():
            self.cache.begin_layer(i, list(range(entry.experts)))
            try:
                self._tables[i] = np.stack([expert_addresses(self.cache.get(i, slot)) for slot in range(entry.experts)])
            finally:
                self.cache.end_layer()
        self.stats_counters.reset()

    def routed_native(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                      residual: np.ndarray) -> np.ndarray:
        """residual + the routed experts [N, D], by the native kernel: all threads on every expert's
        rows; each output sums its experts in ascending slot order (so results do not depend on
        the thread count or the cache)."""
        N, k = ids.shape
        h, residual = np.ascontiguousarray(h, np.float32), np.ascontiguousarray(residual, np.float32)
        bits, round_act, block = self._kernel_layout
        intermediate = self.cache.store.layers[layer].intermediate
        out = np.empty_like(h)
        if N == 1:  # decode: k distinct slots
            order = np.argsort(ids[0])
            slots, tok_start, tok_index = ids[0][order], self._decode_start[k], self._decode_index[k]
        else:
            flat = ids.reshape(-1)
            order = np.argsort(flat, kind="stable")  # [N*k] pairs grouped by slot, tokens ascending
            slots, counts = np.unique(flat[order], return_counts=True)
            tok_start = np.zeros(len(slots) + 1, np.int32)
            np.cumsum(counts, out=tok_start[1:])
            tok_index = (order // k).astype(np.int32)
        tok_weight = np.ascontiguousarray(weights.reshape(-1)[order], np.float32)
        table = self._tables.get(layer)
        if table is not None:  # every expert resident: count the requests as hits, no bookkeeping
            phase = self.stats_counters.phase[self.cache.phase]
            phase["requests"] += len(slots)
            phase["hits"] += len(slots)
            self.stats_counters.histogram[layer][slots] += 1
            t0 = time.perf_counter()
            self.kernel.moe(bits, round_act, block, h, residual, out, table[slots], tok_start, tok_index, tok_weight,
                            intermediate)
            if self.profile is not None:
                self.profile["kernel"] = self.profile.get("kernel", 0.0) + time.perf_counter() - t0
            return out
        slot_list = slots.tolist()
        self.cache.begin_layer(layer, slot_list)
        nxt = self.next_moe.get(layer)
        if nxt is not None and self.cache.prefetch_enabled and len(self.cache.entries) < self._total_experts:
            self.cache.prefetch(nxt, self.predict(nxt, h))  # nothing to predict once every expert is resident
        try:
            experts = [self.cache.get(layer, slot) for slot in slot_list]  # resident for the call
            table = np.stack([expert_addresses(e) for e in experts])
            self.kernel.moe(bits, round_act, block, h, residual, out, table, tok_start, tok_index, tok_weight,
                            intermediate)
        finally:
            self.cache.end_layer()
        return out

    def predict(self, layer: int, h: np.ndarray) -> list[int]:
        """The experts layer's router would pick for h: its top-k of score + bias per token (group
        limits ignored: a prediction only), the most-voted first, at most 2k for a prompt."""
        router, bias = self.routers[layer]
        logits = h @ router.T  # [N, E]
        if self.scoring == "sigmoid":
            choice = 1.0 / (1.0 + np.exp(-logits))
        else:
            choice = np.exp(logits - logits.max(-1, keepdims=True))
            choice /= choice.sum(-1, keepdims=True)
        if bias is not None:
            choice = choice + bias
        k = min(self.k, choice.shape[1])
        top = np.argpartition(-choice, k - 1, axis=1)[:, :k]  # [N, k]
        slots, votes = np.unique(top, return_counts=True)
        return slots[np.argsort(-votes, kind="stable")][:2 * self.k].tolist()

    def stats(self) -> dict:
        """Expert-cache statistics since the last reset (docs/paging.md), and what computed the experts."""
        self.cache.drain()
        out = self.stats_counters.to_json(self.cache)
        out["decoder"] = f"onnxruntime segments ({getattr(self, 'native_unavailable', None) or 'chosen'})"
        out["routed_experts"] = (f"native kernel ({native.status().get('simd', '?')})" if self.kernel is not None
                                 else f"numpy ({native.status().get('reason', 'the store layout needs it')})")
        return out

    def reset_stats(self) -> None:
        self.cache.drain()
        self.stats_counters.reset()

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown()
        if self.kernel is not None:
            self.kernel.close()
        self.cache.close()


def kernel_layout(store: ExpertStore) -> tuple[int, bool, int] | None:
    """(bits, rounds activations, block) the native kernel runs the store's experts with, or None
    when it cannot: experts held dequantized, mixed widths, or an activation block other than the
    weight block."""
    if store.bits is None:
        return 32, False, 0
    if store.holds != "quantized":
        return None
    layouts = {(m["bits"], m["block"]) for layout in store.layouts.values() for m in layout.mats.values()}
    if len(store.layouts) != len(store.layers) or len(layouts) != 1:
        return None
    bits, block = layouts.pop()
    act = store.activation_block
    if act is not None and act != block or block % 32 or block > 128:
        return None
    return bits, act is not None, block


def expert_addresses(expert: Expert) -> np.ndarray:
    """uint64 [6]: gate_up q, scales, zero points; down q, scales, zero points (0: none), the
    addresses the kernel reads; cached on the expert (its buffer lives as long as it does)."""
    cached = getattr(expert, "_addresses", None)
    if cached is None:
        if expert.q is None:
            parts = [expert.w_gate_up, None, None, expert.w_down, None, None]
        else:
            parts = []
            for name in ("gate_up", "down"):
                _, q, scales, zero = expert.q.parts[name]
                parts += [q, scales, zero]
        cached = np.array([native.address(a) for a in parts], np.uint64)
        expert._addresses = cached
    return cached


def _expert_output(expert, x: np.ndarray, weight: np.ndarray, activation_block: int | None = None) -> np.ndarray:
    """weight * w_down(SiLU(gate(x)) * up(x)) for the n tokens x [n, D] routed to one expert: [n, D].
    activation_block: quantize x and the SwiGLU output to int8 per block, as the fused QMoE does."""
    w_gate_up, w_down = expert.weights()  # [2I, D], [D, I]; a quantized expert: dequantized into scratch
    if activation_block:
        x = quantize_activations(x, activation_block)
    gate_up = x @ w_gate_up.T  # [n, 2I]
    inter = gate_up.shape[1] // 2
    gate = gate_up[:, :inter]
    act = gate / (1.0 + np.exp(-gate)) * gate_up[:, inter:]  # [n, I]
    if activation_block:
        act = quantize_activations(act, activation_block)
    return (act @ w_down.T) * weight[:, None]


def _budget(store: ExpertStore, k: int, requested_mb: float | None, default_mb: float | None) -> int:
    """The expert cache's bytes: the request, else the bundle's default, else every expert."""
    largest = max(store.expert_bytes(i) for i in store.layers)
    total = sum(store.expert_bytes(i) * e.experts for i, e in store.layers.items())
    mb = requested_mb if requested_mb is not None else default_mb
    if mb is not None and (not isinstance(mb, (int, float)) or isinstance(mb, bool) or not 0 < mb < 1 << 40):
        raise UserError(f"expert cache size must be a positive number of MiB, got {mb!r}")
    budget = total if mb is None else int(float(mb) * 2**20)
    if budget < k * largest:
        raise UserError(f"expert cache of {float(mb):g} MB is too small: one token needs {k} experts of a layer at once "
                        f"({k * largest / 2**20:.1f} MB); the routed experts total {total / 2**20:.0f} MB")
    return budget
