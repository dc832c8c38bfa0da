"""`dsexport serve` under load: 1, 2, 4 and 8 concurrent clients, each sending streaming
completions of a 128-token prompt for 128 new tokens (ignore_eos, greedy), against a server
that batches (--parallel = the most clients) and against one that serves one request at a time
(--parallel 1: the baseline batching must beat).

Each (server setting, client count) runs a fresh `dsexport serve` process on 127.0.0.1 (port 0),
so its peak RSS is its own. Clients are threads with the standard library's http.client reading
the SSE stream (so the client's cost on a shared machine stays small). Reported per row:
requests/s, aggregate output tokens/s, time to first token p50/p99 as the client saw it and
split into queueing and prefill (the server's `timings` in the last chunk), time per output
token p50/p99, end-to-end latency p50/p99, rejections (429), the server's peak RSS, and for
paged bundles the decode hit rate of the expert cache and the distinct experts one decode step
used per MoE layer (a batch of B rows can use up to B x top_k: batching loads the cache harder).

    python benchmarks/serve.py                                  # the embedded model (built here)
    python benchmarks/serve.py --paged --expert-cache-mb 8      # its paged bundle, a cache of ~40%
    python benchmarks/serve.py --checkpoint /tmp/ckpt-m         # a bigger checkpoint, built here
    python benchmarks/serve.py --bundle dist/model --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dsexport import EMBEDDED_MODEL


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Server:
    """A `dsexport serve` process on an ephemeral port."""

    def __init__(self, bundle: Path, parallel: int, max_queue: int, threads: int, cache_mb: float | None):
        cmd = [sys.executable, "-c", "from dsexport.cli import main; main()", "serve", str(bundle), "--port", "0", "--parallel", str(parallel),
               "--max-queue", str(max_queue), "--threads", str(threads), "--no-verify", "--log-level", "warning"]
        if cache_mb is not None:
            cmd += ["--expert-cache-mb", str(cache_mb)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        seen = ""
        while True:
            line = self.proc.stderr.readline()
            seen += line
            match = re.search(r"http://([\d.]+):(\d+)/v1", line)
            if match or not line:
                break
        if not match:
            self.proc.kill()
            raise SystemExit(f"the server did not start:\n{seen[-3000:]}")
        self.host, self.port = match.group(1), int(match.group(2))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def peak_rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_one(server: Server, model: str, prompt: list[int], new_tokens: int) -> dict:
    """One streaming completion; client-side timestamps and the server's timings."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    # logprobs 0 (the sampled token's own): every token then arrives as its own chunk, also when its
    # text is empty (a random checkpoint's ids beyond its small tokenizer, partial UTF-8), so the
    # client sees each token's time.
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        r.read()
        conn.close()
        return {"status": r.status}
    first, final = None, {}
    for raw in r:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and first is None:
            first = time.perf_counter()
        if chunk.get("usage"):
            final = chunk
    end = time.perf_counter()
    conn.close()
    tokens = final["usage"]["completion_tokens"]
    first = end if first is None else first
    return {"status": 200, "ttft": first - start, "e2e": end - start, "tokens": tokens,
            "tpot": (end - first) / max(tokens - 1, 1), "queue": final["timings"]["queue_s"],
            "prefill": final["timings"]["prefill_s"]}


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.split()[-1])
    return None


def run(bundle: Path, model: str, prompts: list[list[int]], clients: int, parallel: int, args) -> dict:
    server = Server(bundle, parallel, args.max_queue, args.threads, args.expert_cache_mb)
    try:
        stream_one(server, model, prompts[0][:16], 4)  # warm-up: sessions, first allocations
        results, lock = [], threading.Lock()

        def client(c: int) -> None:
            for i in range(args.requests):
                out = stream_one(server, model, prompts[(c * args.requests + i) % len(prompts)], args.new_tokens)
                with lock:
                    results.append(out)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        _, text = server.request("GET", "/metrics")
        text = text.decode()
        rss = server.peak_rss()
    finally:
        server.stop()
    ok = [r for r in results if r["status"] == 200]
    row = {"clients": clients, "parallel": parallel, "requests": len(ok), "rejected": len(results) - len(ok),
           "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
           "peak_rss_mb": rss / 2**20}
    for key in ("ttft", "queue", "prefill", "tpot", "e2e"):
        values = [r[key] for r in ok]
        row[f"{key}_p50_ms"], row[f"{key}_p99_ms"] = (1e3 * pct(values, 50), 1e3 * pct(values, 99)) if values else (None, None)
    row["cache_hit_rate"] = metric(text, "dsexport_expert_cache_hit_rate")
    steps, used = metric(text, "dsexport_experts_per_layer_step_count"), metric(text, "dsexport_experts_per_layer_step_sum")
    row["experts_per_layer_step"] = used / steps if steps else None
    return row


def prompts_for(server_bundle: Path, model: str, n: int, length: int, args) -> list[list[int]]:
    """n windows of `length` tokens from the embedded model's English test text, via /tokenize."""
    text = (EMBEDDED_MODEL / "test.english.txt").read_text(encoding="utf-8")[: 200 * length * n]
    server = Server(server_bundle, 1, 0, args.threads, args.expert_cache_mb)
    try:
        _, body = server.request("POST", "/tokenize", {"content": text})
    finally:
        server.stop()
    ids = json.loads(body)["tokens"]
    step = max(1, (len(ids) - length) // max(n, 1))
    return [ids[i * step: i * step + length] for i in range(n) if len(ids[i * step: i * step + length]) == length]


def build(checkpoint: Path, out: Path, paged: bool) -> Path:
    from dsexport.build import BuildConfig, build_bundle

    if not (out / "manifest.json").is_file():
        build_bundle(BuildConfig(checkpoint, out, paged=paged))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="an existing bundle (default: build one of --checkpoint)")
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_MODEL, help="default: the embedded model")
    p.add_argument("--paged", action="store_true", help="build the bundle with --paged")
    p.add_argument("--expert-cache-mb", type=float, default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    bundle = args.bundle
    if bundle is None:  # built into a temporary directory, left for a rerun with --bundle
        work = Path(tempfile.mkdtemp(prefix="dsexport-serve-bench-"))
        bundle = build(args.checkpoint, work / ("bundle-paged" if args.paged else "bundle"), args.paged)
        print(f"bundle: {bundle}", flush=True)
    model = bundle.resolve().name
    prompts = prompts_for(bundle, model, max(args.clients) * args.requests, args.prompt_tokens, args)
    rows = []
    for parallel in (max(args.clients), 1):
        for clients in args.clients:
            rows.append(run(bundle, model, prompts, clients, parallel, args))
            print_row(rows[-1], header=len(rows) == 1)
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(bundle), "cpu_count": os.cpu_count(), "rows": rows}, indent=2))


COLUMNS = [("parallel", "par", 0), ("clients", "cli", 0), ("requests_per_s", "req/s", 2),
           ("output_tokens_per_s", "tok/s", 0), ("ttft_p50_ms", "ttft50", 0), ("ttft_p99_ms", "ttft99", 0),
           ("queue_p50_ms", "queue50", 0), ("queue_p99_ms", "queue99", 0), ("prefill_p50_ms", "pref50", 0),
           ("prefill_p99_ms", "pref99", 0), ("tpot_p50_ms", "tpot50", 1), ("tpot_p99_ms", "tpot99", 1),
           ("e2e_p50_ms", "e2e50", 0), ("e2e_p99_ms", "e2e99", 0), ("rejected", "rej", 0), ("peak_rss_mb", "rssMB", 0),
           ("cache_hit_rate", "hit", 3), ("experts_per_layer_step", "exp/L", 2)]


def print_row(row: dict, header: bool) -> None:
    """One line per run (times in ms; exp/L: distinct experts per MoE layer per decode step)."""
    width = 7
    if header:
        print(" ".join(f"{title:>{width}}" for _, title, _ in COLUMNS), flush=True)
    print(" ".join(f"{'-':>{width}}" if row[key] is None else f"{row[key]:>{width}.{digits}f}"
                   for key, _, digits in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
