"""Expert paging: routed experts read from the bundle's store into a cache within a byte budget.

  ExpertStore   reads one expert's record with os.preadv straight into a numpy buffer: the bytes
                land in this process's memory once (the OS page cache may also keep the file's
                pages, outside the process's RSS; nothing is memory-mapped, so RSS counts exactly
                the cached experts)
                Records are fp32, or int8/int4 with block scales (quantize.quantize_rows's layout);
                a quantized expert stays quantized in the cache and is dequantized per use into
                a per-thread scratch buffer (QuantizedExpert.dequantize), unless
                DSEXPORT_EXPERT_CACHE_HOLDS=fp32 (dequantized once, on read)
  ExpertCache   resident experts keyed (layer, slot), never more bytes than the budget (space is
                reserved before a read starts); an eviction policy picks victims; a background
                thread prefetches predicted experts
  policies      "lru"; "lfu" (decayed request frequency, kept for every expert ever requested,
                resident or not), the default: MoE layers are visited in a cycle, so LRU evicts
                exactly the experts of the layer needed next, while request frequency estimates
                the chance an expert is needed the next time its layer runs
  PagingStats   per generation: requests, hits, bytes read, time stalled on loads, per layer
                histograms of expert requests, prefetch accuracy
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsexport.core.errors import BundleError, UserError
from dsexport.core.quant import quantize_activations  # noqa: F401  (the experts' activation rounding)
from dsexport.core.sections import PagingSection

Key = tuple[int, int]  # (layer, expert slot)
POLICIES = ("lfu", "lru")
DEFAULT_POLICY = "lfu"
LFU_DECAY = 0.95  # per forward step: a request 14 steps ago counts half as much as one now


# What the cache holds of a quantized store (docs/paging.md): "quantized", the records as read
# (the budget counts quantized bytes; each use dequantizes into a per-thread scratch buffer), or
# "fp32", dequantized once when read (the budget counts fp32 bytes). A measurement switch:
# DSEXPORT_EXPERT_CACHE_HOLDS=fp32 (benchmarks/paging.py --holds).
HOLDS = ("quantized", "fp32")
DEFAULT_HOLDS = "quantized"


@dataclasses.dataclass
class Expert:
    w_gate_up: np.ndarray | None  # [2I, D] float32; None while quantized (see q)
    w_down: np.ndarray | None  # [D, I]
    nbytes: int  # bytes held in the cache: what the budget counts
    buffer: np.ndarray  # the record (or its dequantized copy) the arrays are views of
    read_bytes: int = 0  # bytes read from the store
    q: "QuantizedExpert | None" = None

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(w_gate_up [2I, D], w_down [D, I]) float32; a quantized expert is dequantized into this
        thread's scratch buffers, valid until the thread's next call."""
        if self.q is None:
            return self.w_gate_up, self.w_down
        return self.q.dequantize(_scratch())


_local = threading.local()


def _scratch() -> dict:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def _buffer(scratch: dict, name: str, shape: tuple, dtype) -> np.ndarray:
    buf = scratch.get(name)
    if buf is None or buf.shape != shape:
        buf = scratch[name] = np.empty(shape, dtype)
    return buf


class QuantLayout:
    """Where a quantized record's parts lie (exporter/paged.py, _StoreWriter._quantized): scales
    float32 of gate_up then down, packed q of both, then (asymmetric) zero points, one byte per block."""

    def __init__(self, entry, zero_points: bool):
        inter, D = entry.intermediate, entry.hidden
        self.mats = {}
        shapes = {"gate_up": (2 * inter, D), "down": (D, inter)}
        for name, (R, K) in shapes.items():
            m = entry.quantized[name]
            bits, block, Kp = m.bits, m.block, m.padded
            self.mats[name] = dict(rows=R, K=K, bits=bits, block=block, padded=Kp, blocks=Kp // block)
        offset = 0
        for part, size in (("scales", lambda m: m["rows"] * m["blocks"] * 4),
                           ("q", lambda m: m["rows"] * m["padded"] * m["bits"] // 8),
                           ("zero", lambda m: m["rows"] * m["blocks"] if zero_points else 0)):
            for m in self.mats.values():
                m[part] = (offset, size(m))
                offset += size(m)
        self.nbytes = offset
        self.zero_points = zero_points
        self.dequantized_bytes = sum(m["rows"] * m["padded"] * 4 for m in self.mats.values())

    def view(self, buf: np.ndarray) -> "QuantizedExpert":
        return QuantizedExpert(self, buf)


class QuantizedExpert:
    """One record's views: scales [R, Kp/B] float32, q [R, Kp*bits/8] uint8, zero [R, Kp/B] uint8."""

    def __init__(self, layout: QuantLayout, buf: np.ndarray):
        self.layout, self.parts = layout, {}
        for name, m in layout.mats.items():
            R, nb = m["rows"], m["blocks"]
            (so, sn), (qo, qn), (zo, zn) = m["scales"], m["q"], m["zero"]
            scales = buf[so:so + sn].view(np.float32).reshape(R, nb)
            q = buf[qo:qo + qn].reshape(R, m["padded"] * m["bits"] // 8)
            zero = buf[zo:zo + zn].reshape(R, nb) if layout.zero_points else None
            self.parts[name] = (m, q, scales, zero)

    def dequantize(self, scratch: dict, out: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """quantize.dequantize_rows bit for bit ((q - offset) * scale in float32), vectorized:
        int4 nibbles unpacked with bit ops into the even/odd columns, scales broadcast over blocks."""
        result = []
        for name in ("gate_up", "down"):
            m, q, scales, zero = self.parts[name]
            R, Kp, bits, block = m["rows"], m["padded"], m["bits"], m["block"]
            w = out[name] if out is not None else _buffer(scratch, "w_" + name, (R, Kp), np.float32)  # [R, Kp]
            offset = np.float32(0 if zero is not None else 1 << (bits - 1))
            if bits == 4:
                pairs = w.reshape(R, Kp // 2, 2)  # even index in the low nibble (quantize.pack)
                nibble = _buffer(scratch, "nibble_" + name, q.shape, np.uint8)  # [R, Kp/2]
                np.bitwise_and(q, 15, out=nibble)
                np.subtract(nibble, offset, out=pairs[..., 0], dtype=np.float32)
                np.right_shift(q, 4, out=nibble)
                np.subtract(nibble, offset, out=pairs[..., 1], dtype=np.float32)
            else:
                np.subtract(q, offset, out=w, dtype=np.float32)
            blocks = w.reshape(R, Kp // block, block)  # [R, nb, B]
            if zero is not None:
                np.subtract(blocks, zero[..., None], out=blocks, dtype=np.float32)
            np.multiply(blocks, scales[..., None], out=blocks)
            result.append(w[:, :m["K"]] if Kp != m["K"] else w)
        return result[0], result[1]


class ExpertStore:
    def __init__(self, path: Path, paging: PagingSection, holds: str | None = None):
        if not path.is_file():
            raise BundleError(f"{path}: the expert store is missing from the bundle")
        self.path = path
        self.layers = dict(paging.layers)  # layer -> StoreLayer (core/sections.py)
        self.precision = paging.precision
        self.bits = paging.bits
        holds = holds or os.environ.get("DSEXPORT_EXPERT_CACHE_HOLDS") or DEFAULT_HOLDS
        if holds not in HOLDS:
            raise UserError(f"expert cache holds one of {', '.join(HOLDS)}, got {holds!r}")
        self.holds = holds if self.bits else "fp32"
        # int8 activations: the fused QMoE quantizes the expert input and SwiGLU output (its
        # 8-bit path always, its 4-bit path at accuracy_level 4); the expert path emulates that
        self.activation_block = paging.activation_quant_block
        self.layouts = {i: QuantLayout(e, paging.zero_points) for i, e in self.layers.items()
                        if e.quantized is not None}
        for i, layout in self.layouts.items():
            if layout.nbytes != self.record_bytes(i):
                raise BundleError(f"{path}: layer {i}'s records are {self.record_bytes(i)} bytes, their layout says "
                                  f"{layout.nbytes}")
        self._check_bounds(path.stat().st_size)
        self._fd = os.open(path, os.O_RDONLY)

    def _check_bounds(self, size: int) -> None:
        """Every record, router and bias the index names lies inside the file (a short read would
        otherwise surface mid-generation)."""
        for i, entry in self.layers.items():
            if i not in self.layouts and entry.record_bytes != 3 * entry.intermediate * entry.hidden * 4:
                raise BundleError(f"{self.path}: layer {i}'s fp32 records are not 3 x {entry.intermediate} x "
                                  f"{entry.hidden} float32 values")
            spans = [(o, entry.record_bytes) for o in entry.offsets] + [(entry.router, entry.experts * entry.hidden * 4)]
            if entry.bias is not None:
                spans.append((entry.bias, entry.experts * 4))
            if any(offset + length > size for offset, length in spans):
                raise BundleError(f"{self.path}: layer {i}'s index points past the end of the store")

    def record_bytes(self, layer: int) -> int:
        """Bytes of one expert's record in the store: what one read costs."""
        return self.layers[layer].record_bytes

    def expert_bytes(self, layer: int) -> int:
        """Bytes one expert of the layer takes in the cache: what the budget counts."""
        if self.holds == "fp32" and layer in self.layouts:
            return self.layouts[layer].dequantized_bytes
        return self.record_bytes(layer)

    def _pread(self, layer: int, slot: int, buf: np.ndarray) -> None:
        n = os.preadv(self._fd, [memoryview(buf).cast("B")], self.layers[layer].offsets[slot])
        if n != buf.nbytes:
            raise BundleError(f"{self.path}: short read of expert {slot} of layer {layer} ({n} of {buf.nbytes} bytes)")

    def read(self, layer: int, slot: int, buf: np.ndarray | None = None) -> Expert:
        """buf: an evicted expert's buffer to read into. Reusing buffers matters: a fresh 6 MB
        buffer's page faults cost 3-20 ms per expert here, against 1.6-2 ms for the read itself
        (measured on checkpoint M's records), and freed buffers would linger in malloc's arenas."""
        entry = self.layers[layer]
        inter, D = entry.intermediate, entry.hidden
        layout = self.layouts.get(layer)
        if layout is None:  # fp32 record
            if buf is None or buf.dtype != np.float32 or buf.size != 3 * inter * D:
                buf = np.empty(3 * inter * D, np.float32)
            self._pread(layer, slot, buf)
            return Expert(buf[:2 * inter * D].reshape(2 * inter, D), buf[2 * inter * D:].reshape(D, inter), buf.nbytes,
                          buf, buf.nbytes)
        if self.holds == "quantized":
            if buf is None or buf.dtype != np.uint8 or buf.size != layout.nbytes:
                buf = np.empty(layout.nbytes, np.uint8)
            self._pread(layer, slot, buf)
            return Expert(None, None, buf.nbytes, buf, buf.nbytes, layout.view(buf))
        # held dequantized: read into this thread's scratch, dequantize into the cache's buffer
        scratch = _scratch()
        raw = _buffer(scratch, f"record_{layout.nbytes}", (layout.nbytes,), np.uint8)
        self._pread(layer, slot, raw)
        gu, down = layout.mats["gate_up"], layout.mats["down"]
        split = gu["rows"] * gu["padded"]
        if buf is None or buf.dtype != np.float32 or buf.nbytes != layout.dequantized_bytes:
            buf = np.empty(layout.dequantized_bytes // 4, np.float32)
        out = {"gate_up": buf[:split].reshape(gu["rows"], gu["padded"]),
               "down": buf[split:].reshape(down["rows"], down["padded"])}
        w_gate_up, w_down = layout.view(raw).dequantize(scratch, out)
        return Expert(w_gate_up, w_down, buf.nbytes, buf, layout.nbytes)

    def router(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's router [E, D] and correction bias [E] (kept resident by the prefetcher)."""
        entry = self.layers[layer]
        E, D = entry.experts, entry.hidden
        router = np.empty((E, D), np.float32)
        os.preadv(self._fd, [memoryview(router).cast("B")], entry.router)
        bias = None
        if entry.bias is not None:
            bias = np.empty(E, np.float32)
            os.preadv(self._fd, [memoryview(bias).cast("B")], entry.bias)
        return router, bias

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

class LRUPolicy:
    name = "lru"

    def __init__(self):
        self._last: dict[Key, int] = {}
        self._tick = 0

    def requested(self, key: Key, step: int) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def loaded(self, key: Key, step: int) -> None:
        self._tick += 1
        self._last[key] = self._tick

    def victim(self, candidates, step: int) -> Key:
        return min(candidates, key=lambda k: self._last.get(k, 0))


class DecayedLFUPolicy:
    """Score = sum over past requests of LFU_DECAY^(steps ago), remembered for every expert (so an
    expert that keeps being requested earns residency even while it is evicted). Ties go to
    the least recently requested."""

    name = "lfu"

    def __init__(self, decay: float = LFU_DECAY):
        self.decay = decay
        self._score: dict[Key, tuple[float, int]] = {}  # key -> (score at step, step)
        self._last: dict[Key, int] = {}
        self._tick = 0

    def _now(self, key: Key, step: int) -> float:
        score, at = self._score.get(key, (0.0, step))
        return score * self.decay ** (step - at)

    def requested(self, key: Key, step: int) -> None:
        self._score[key] = (self._now(key, step) + 1.0, step)
        self._tick += 1
        self._last[key] = self._tick

    def loaded(self, key: Key, step: int) -> None:
        pass  # a prefetched expert earns its score when it is requested

    def victim(self, candidates, step: int) -> Key:
        return min(candidates, key=lambda k: (self._now(k, step), self._last.get(k, 0)))


def make_policy(name: str):
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return DecayedLFUPolicy()
    raise UserError(f"cache policy must be one of {', '.join(POLICIES)}, got {name!r}")


class PagingStats:
    """Counters of one generation (reset by the engine at its start)."""

    def __init__(self, layers: list[int], experts: dict[int, int]):
        self.layers, self.experts = layers, experts
        self.reset()

    def reset(self) -> None:
        self.phase = {p: dict(requests=0, hits=0, loads=0, bytes_read=0, stall_s=0.0, tokens=0, steps=0)
                      for p in ("prefill", "decode")}
        self.prefetch = dict(issued=0, loaded=0, used=0, late=0, bytes_read=0, decode_bytes=0)
        self.histogram = {i: np.zeros(self.experts[i], np.int64) for i in self.layers}

    def to_json(self, cache: "ExpertCache") -> dict:
        decode, prefill = self.phase["decode"], self.phase["prefill"]
        rate = lambda p: p["hits"] / p["requests"] if p["requests"] else None  # noqa: E731
        read = sum(p["bytes_read"] for p in self.phase.values()) + self.prefetch["bytes_read"]
        return {
            "policy": cache.policy.name, "prefetch": cache.prefetch_enabled,
            # the store's precision, and what the cache holds (budget_bytes counts those bytes)
            "store_precision": cache.store.precision, "cache_holds": cache.store.holds,
            "budget_bytes": cache.budget, "resident_bytes": cache.used, "resident_experts": len(cache.entries),
            "total_experts": sum(self.experts.values()),
            "hit_rate": rate(decode), "prefill_hit_rate": rate(prefill),
            # decode: what one generated token costs; everything read, prefetches included
            "bytes_read_per_token": (decode["bytes_read"] + self.prefetch["decode_bytes"]) / decode["tokens"]
            if decode["tokens"] else None,
            "bytes_read": read, "stall_s": sum(p["stall_s"] for p in self.phase.values()),
            "decode": dict(decode), "prefill": dict(prefill),
            "prefetches": {k: v for k, v in self.prefetch.items()},
            "expert_histograms": {str(i): h.tolist() for i, h in self.histogram.items()},
        }


class _Pending:
    def __init__(self):
        self.done = threading.Event()
        self.expert: Expert | None = None
        self.prefetched = False


class ExpertCache:
    """Resident experts within `budget` bytes. The main thread calls begin_layer/get/end_layer;
    the prefetch thread calls _prefetch_one. One lock guards the bookkeeping; reads run outside it."""

    def __init__(self, store: ExpertStore, budget: int, policy: str, prefetch: bool, stats: PagingStats):
        self.store, self.budget, self.stats = store, int(budget), stats
        self.policy = make_policy(policy)
        self.prefetch_enabled = prefetch
        self.entries: dict[Key, Expert] = {}
        self.used = 0  # bytes of resident experts plus reservations for reads in flight
        self._pending: dict[Key, _Pending] = {}
        self._protected: set[Key] = set()  # the current layer's experts
        self._wanted: set[Key] = set()  # predicted for the next layer: kept until it runs
        self._prefetched: set[Key] = set()  # loaded by a prefetch, not requested since
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsexport-prefetch") if prefetch else None
        self.step = 0
        self.phase = "decode"

    # ---- space --------------------------------------------------------------------------
    def _reserve(self, nbytes: int, keep: set[Key]) -> tuple[bool, np.ndarray | None]:
        """Evict until nbytes fit (lock held): (False, None) when only protected experts are left,
        else (True, the last victim's buffer to read into). Victims are never in use: the
        experts of the layer being computed are protected until all of them are done."""
        recycled = None
        while self.used + nbytes > self.budget:
            candidates = [k for k in self.entries if k not in keep]
            if not candidates:
                return False, None
            victim = self.policy.victim(candidates, self.step)
            expert = self.entries.pop(victim)
            self.used -= expert.nbytes
            recycled = expert.buffer
            self._prefetched.discard(victim)
        self.used += nbytes
        return True, recycled

    # ---- main thread --------------------------------------------------------------------
    def begin_layer(self, layer: int, slots: list[int]) -> None:
        with self._lock:
            self._protected = {(layer, s) for s in slots}
            self._wanted -= self._protected

    def end_layer(self) -> None:
        with self._lock:
            self._protected = set()

    def get(self, layer: int, slot: int) -> Expert:
        """The expert's weights: resident (a hit), or read now (the main thread stalls on it)."""
        key, phase = (layer, slot), self.stats.phase[self.phase]
        phase["requests"] += 1
        self.stats.histogram[layer][slot] += 1
        with self._lock:
            self.policy.requested(key, self.step)
            expert = self.entries.get(key)
            if expert is not None:
                phase["hits"] += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch["used"] += 1
                return expert
            pending = self._pending.get(key)
            own = pending is None
            if own:
                pending = self._pending[key] = _Pending()
                # no room without evicting this layer's or the next layer's experts: read it
                # without caching it (only when the budget is about one layer's worth)
                cached, buf = self._reserve(self.store.expert_bytes(layer), self._protected | self._wanted)
        start = time.perf_counter()
        if own:
            try:
                expert = self.store.read(layer, slot, buf)
            finally:
                with self._lock:
                    if expert is not None and cached:
                        self.entries[key] = expert
                        self.policy.loaded(key, self.step)
                    elif cached:
                        self.used -= self.store.expert_bytes(layer)
                    self._pending.pop(key, None)
                pending.expert = expert
                pending.done.set()
            phase["loads"] += 1
            phase["bytes_read"] += expert.read_bytes
        else:  # its prefetch is in flight: wait for it rather than read it twice
            pending.done.wait()
            self.stats.prefetch["late"] += 1
            expert = pending.expert if pending.expert is not None else self.store.read(layer, slot)
        phase["stall_s"] += time.perf_counter() - start
        return expert

    # ---- prefetch -----------------------------------------------------------------------
    def prefetch(self, layer: int, slots: list[int]) -> None:
        """Load these experts of `layer` in the background; earlier predictions are dropped."""
        if self._pool is None:
            return
        keys = [(layer, s) for s in slots]
        with self._lock:
            self._wanted = set(keys)
        for key in keys:
            self.stats.prefetch["issued"] += 1
            self._pool.submit(self._prefetch_one, key)

    def _prefetch_one(self, key: Key) -> None:
        layer = key[0]
        with self._lock:
            if key not in self._wanted or key in self.entries or key in self._pending:
                return
            reserved, buf = self._reserve(self.store.expert_bytes(layer), self._protected | self._wanted)
            if not reserved:
                return
            pending = self._pending[key] = _Pending()
        expert = None
        try:
            expert = self.store.read(layer, key[1], buf)
        finally:
            with self._lock:
                if expert is not None:
                    self.entries[key] = expert
                    self._prefetched.add(key)
                    self.policy.loaded(key, self.step)
                    self.stats.prefetch["loaded"] += 1
                    self.stats.prefetch["bytes_read"] += expert.read_bytes
                    self.stats.prefetch["decode_bytes"] += expert.read_bytes if self.phase == "decode" else 0
                else:
                    self.used -= self.store.expert_bytes(layer)
                self._pending.pop(key, None)
            pending.expert = expert
            pending.done.set()

    def drain(self) -> None:
        """Wait for prefetches in flight (before stats are read, or on close)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
