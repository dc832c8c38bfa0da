"""Expert-cache counters of a paged bundle, accumulated over the server's life.

The paged backend counts expert uses, hits, bytes read and stalls since its last reset
(runtime/paging.py PagingStats; Engine.stream resets them). The scheduler reads them after every
engine step and adds what changed to its own running totals, so /metrics is cumulative whatever
resets, and a response's `expert_cache` is the difference between the totals when it started and
when it finished: the steps it took part in, shared with the requests batched with it.
"""

from __future__ import annotations

import copy

import numpy as np

PHASE_FIELDS = ("requests", "hits", "loads", "bytes_read", "stall_s", "tokens", "steps")
PREFETCH_FIELDS = ("issued", "loaded", "used", "late", "bytes_read", "decode_bytes")


def _zero() -> dict:
    return {"decode": dict.fromkeys(PHASE_FIELDS, 0), "prefill": dict.fromkeys(PHASE_FIELDS, 0),
            "prefetches": dict.fromkeys(PREFETCH_FIELDS, 0), "histograms": {}}


class CacheCounters:
    def __init__(self, backend):
        self.backend = backend
        self.enabled = hasattr(backend, "stats")
        self.totals = _zero()
        self.static: dict = {}
        self._last = _zero()  # the backend's counters when last read
        if self.enabled:
            backend.reset_stats()

    def expect_reset(self) -> None:
        """The backend's counters are about to be reset (Engine.stream does): count from zero."""
        if self.enabled:
            self.update()
            self._last = _zero()

    def snapshot(self) -> dict | None:
        return copy.deepcopy(self.totals) if self.enabled else None

    def update(self, metrics=None) -> None:
        """Read the backend's counters and add what changed since the last read."""
        if not self.enabled:
            return
        raw = self.backend.stats()
        now = {"decode": {k: raw["decode"][k] for k in PHASE_FIELDS},
               "prefill": {k: raw["prefill"][k] for k in PHASE_FIELDS},
               "prefetches": {k: raw["prefetches"][k] for k in PREFETCH_FIELDS},
               "histograms": {layer: np.asarray(h, np.int64) for layer, h in raw["expert_histograms"].items()}}
        reset = now["decode"]["requests"] < self._last["decode"]["requests"] or \
            now["prefill"]["requests"] < self._last["prefill"]["requests"]
        last = _zero() if reset else self._last
        totals = copy.deepcopy(self.totals)
        for group in ("decode", "prefill", "prefetches"):
            for key, value in now[group].items():
                totals[group][key] += value - last[group][key]
        for layer, h in now["histograms"].items():
            before = last["histograms"].get(layer, 0)
            totals["histograms"][layer] = totals["histograms"].get(layer, 0) + (h - before)
        steps = now["decode"]["steps"] - last["decode"]["steps"]
        layers = len(now["histograms"])
        if metrics is not None and steps == 1 and layers:  # one decode forward: experts it touched per layer
            used = (now["decode"]["requests"] - last["decode"]["requests"]) / layers
            metrics.observe("dsexport_experts_per_layer_step", used)
        self.static = {k: raw[k] for k in ("policy", "prefetch", "budget_bytes", "resident_bytes", "resident_experts",
                                           "total_experts")}
        self.totals, self._last = totals, now  # swapped whole: /metrics reads them from the event loop

    def since(self, baseline: dict | None) -> dict:
        """The per-response figures: the totals now minus those at `baseline`."""
        base = baseline or _zero()
        d = {g: {k: self.totals[g][k] - base[g][k] for k in self.totals[g]} for g in ("decode", "prefill", "prefetches")}
        dec, pre = d["decode"], d["prefill"]
        layers = max(len(self.totals["histograms"]), 1)
        read = dec["bytes_read"] + pre["bytes_read"] + d["prefetches"]["bytes_read"]
        return {
            "hit_rate": round(dec["hits"] / dec["requests"], 4) if dec["requests"] else None,
            "prefill_hit_rate": round(pre["hits"] / pre["requests"], 4) if pre["requests"] else None,
            "bytes_read": int(read),
            "bytes_read_per_token": round((dec["bytes_read"] + d["prefetches"]["decode_bytes"]) / dec["tokens"], 1)
            if dec["tokens"] else None,
            "stall_s": round(dec["stall_s"] + pre["stall_s"], 6),
            "decode_steps": int(dec["steps"]),
            "rows_per_step": round(dec["tokens"] / dec["steps"], 3) if dec["steps"] else None,
            "experts_per_layer_step": round(dec["requests"] / dec["steps"] / layers, 3) if dec["steps"] else None,
            "policy": self.static.get("policy"), "budget_bytes": self.static.get("budget_bytes"),
        }

    def as_stats(self) -> dict | None:
        """The totals in the shape of the backend's stats() (metrics.expert_cache_samples)."""
        if not self.enabled or not self.static:
            return None
        t = self.totals
        return {**self.static, "decode": t["decode"], "prefill": t["prefill"],
                "bytes_read": t["decode"]["bytes_read"] + t["prefill"]["bytes_read"] + t["prefetches"]["bytes_read"],
                "stall_s": t["decode"]["stall_s"] + t["prefill"]["stall_s"],
                "expert_histograms": {k: np.asarray(v).tolist() for k, v in t["histograms"].items()}}
