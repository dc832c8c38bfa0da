"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges and
histograms, updated by the scheduler's worker thread and the event loop, rendered on GET /metrics.

What is exported is listed in docs/serve.md. Expert-aware series (routing per layer, cache hit
rate, experts touched per decode step) come from the paged backend's counters; a fused bundle
routes inside its graph and exports none of them.
"""

from __future__ import annotations

import bisect
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, total = [], 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            total += count
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {total}")
        out.append(f"{name}_sum{_labels(labels)} {_number(round(self.sum, 9))}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Registry:
    """Named series with help text; thread-safe. Gauges may be callables read at render time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[tuple, float | Histogram]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._callbacks: list = []  # () -> [(name, type, help, [(labels, value)])]

    def declare(self, name: str, kind: str, help_text: str, buckets: tuple[float, ...] | None = None) -> None:
        self._meta[name] = (kind, help_text)
        self._values.setdefault(name, {})
        if buckets is not None:
            self._buckets[name] = buckets

    def collect_with(self, callback) -> None:
        self._callbacks.append(callback)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            if key not in series:
                series[key] = Histogram(self._buckets[name])
            series[key].observe(value)

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (0 when never set); a histogram's count."""
        with self._lock:
            item = self._values[name].get(tuple(sorted(labels.items())), 0.0)
            return item.count if isinstance(item, Histogram) else item

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self._meta.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                series = self._values[name]
                if not series and kind != "histogram":
                    lines.append(f"{name} 0")
                for key, item in sorted(series.items()):
                    labels = dict(key)
                    if isinstance(item, Histogram):
                        lines += item.lines(name, labels)
                    else:
                        lines.append(f"{name}{_labels(labels)} {_number(item)}")
        for callback in self._callbacks:
            for name, kind, help_text, samples in callback():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
        return "\n".join(lines) + "\n"


def server_metrics() -> Registry:
    """The series the server updates (docs/serve.md, "Metrics")."""
    r = Registry()
    r.declare("dsexport_requests_total", "counter", "HTTP requests answered, by endpoint and status code")
    r.declare("dsexport_rejected_total", "counter", "Generation requests refused before running, by reason")
    r.declare("dsexport_generations_total", "counter", "Generation requests finished, by outcome")
    r.declare("dsexport_choices_total", "counter", "Choices finished, by finish_reason")
    r.declare("dsexport_prompt_tokens_total", "counter", "Prompt tokens of admitted requests")
    r.declare("dsexport_generated_tokens_total", "counter", "Tokens generated")
    r.declare("dsexport_decode_steps_total", "counter", "Engine steps run (each decodes one token for every running row)")
    r.declare("dsexport_queue_seconds", "histogram", "Time from admission to the engine step that started the request",
              LATENCY_BUCKETS)
    r.declare("dsexport_prefill_seconds", "histogram", "Time from that step's start to the request's first token",
              LATENCY_BUCKETS)
    r.declare("dsexport_time_to_first_token_seconds", "histogram", "Time from admission to the first token (queue + "
              "prefill)", LATENCY_BUCKETS)
    r.declare("dsexport_time_per_output_token_seconds", "histogram", "Mean time between a request's tokens after its "
              "first", TOKEN_TIME_BUCKETS)
    r.declare("dsexport_request_seconds", "histogram", "Time from admission to the last token", LATENCY_BUCKETS)
    r.declare("dsexport_request_tokens_per_second", "histogram", "A request's decode speed (tokens after the first "
              "over the time they took)", RATE_BUCKETS)
    r.declare("dsexport_step_seconds", "histogram", "Duration of one engine step", TOKEN_TIME_BUCKETS)
    r.declare("dsexport_batch_rows", "histogram", "Rows decoding in one engine step", COUNT_BUCKETS)
    r.declare("dsexport_experts_per_layer_step", "histogram", "Paged bundles: distinct routed experts one decode "
              "step used per MoE layer (a batch of B rows can use up to B x top_k)", COUNT_BUCKETS)
    r.declare("dsexport_draft_tokens_total", "counter", "MTP drafting: draft tokens proposed")
    r.declare("dsexport_draft_accepted_total", "counter", "MTP drafting: draft tokens accepted")
    return r


def expert_cache_samples(stats: dict | None) -> list:
    """Series from the paged backend's cumulative counters (runtime/paging.py PagingStats)."""
    if stats is None:
        return []
    decode, prefill = stats["decode"], stats["prefill"]
    out = [
        ("dsexport_expert_cache_requests_total", "counter", "Routed expert uses, by phase",
         [({"phase": "decode"}, decode["requests"]), ({"phase": "prefill"}, prefill["requests"])]),
        ("dsexport_expert_cache_hits_total", "counter", "Routed expert uses found resident, by phase",
         [({"phase": "decode"}, decode["hits"]), ({"phase": "prefill"}, prefill["hits"])]),
        ("dsexport_expert_cache_hit_rate", "gauge", "Decode hit rate since the server started",
         [({}, decode["hits"] / decode["requests"] if decode["requests"] else 0.0)]),
        ("dsexport_expert_cache_bytes_read_total", "counter", "Bytes read from the expert store, prefetches included",
         [({}, stats["bytes_read"])]),
        ("dsexport_expert_cache_stall_seconds_total", "counter", "Time the engine waited on expert reads",
         [({}, round(stats["stall_s"], 6))]),
        ("dsexport_expert_cache_resident_bytes", "gauge", "Bytes of experts resident", [({}, stats["resident_bytes"])]),
        ("dsexport_expert_cache_budget_bytes", "gauge", "The expert cache's budget", [({}, stats["budget_bytes"])]),
    ]
    routed, imbalance, used = [], [], []
    for layer, counts in sorted(stats["expert_histograms"].items(), key=lambda kv: int(kv[0])):
        total = sum(counts)
        routed.append(({"layer": layer}, total))
        mean = total / len(counts) if counts else 0.0
        imbalance.append(({"layer": layer}, round(max(counts) / mean, 4) if mean else 0.0))
        used.append(({"layer": layer}, sum(1 for c in counts if c)))
    out += [
        ("dsexport_expert_routing_total", "counter",
         "Routed expert uses per MoE layer (one per expert a forward step used)", routed),
        ("dsexport_expert_routing_imbalance", "gauge",
         "Per MoE layer: the most used expert's count over the mean (1 = balanced)", imbalance),
        ("dsexport_experts_used", "gauge", "Per MoE layer: experts used at least once", used),
    ]
    return out
