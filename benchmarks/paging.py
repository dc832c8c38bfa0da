"""Expert paging on checkpoint M: a cache of a fraction of the routed experts against all resident.

For each setting, in its own process (peak RSS is per process): the paged bundle generates the
same prompt greedily; printed are whether its tokens equal the all-resident run's, the decode
hit rate, bytes read from the store per decoded token, decode tokens/s, time stalled on loads,
prefetch accuracy, and peak RSS against budget + non-expert weights. Settings: all resident;
LRU and LFU, each with and without prefetch. The segments' weights (the non-expert weights) are
memory-mapped by ONNX Runtime (weights="mmap"); experts are read with pread into the cache.
With --fused, the fused-op bundle of the same checkpoint runs too, and its logits are compared
with the paged bundle's (teacher-forced on the paged tokens).

A quantized store (build --paged --precision int4|int8) is checked against --precision. Its
cache holds the quantized records by default; --holds both adds LFU + prefetch runs with the
cache holding dequantized fp32 experts (DSEXPORT_EXPERT_CACHE_HOLDS=fp32) at the same budget.

    python benchmarks/make_checkpoint_m.py /tmp/ckpt-m
    dsexport build --model /tmp/ckpt-m --out /tmp/bundle-m-paged --paged
    python benchmarks/paging.py --bundle /tmp/bundle-m-paged --fused /tmp/bundle-m
    dsexport build --model /tmp/ckpt-m --out /tmp/bundle-m-paged-int4 --paged --precision int4
    python benchmarks/paging.py --bundle /tmp/bundle-m-paged-int4 --precision int4 --holds both --fused /tmp/bundle-m-int4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

RSS = 'int([l for l in open("/proc/self/status") if l.startswith("{key}:")][0].split()[1]) * 1024'


def run_child(code: str, threads: int, holds: str = "quantized") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "DSEXPORT_EXPERT_CACHE_HOLDS": holds}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the store's cached pages (clean pages; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def paged_run(bundle: Path, prompt: list[int], new_tokens: int, threads: int, cache_mb: float | None,
              policy: str, prefetch: bool, holds: str = "quantized") -> dict:
    return run_child(f"""
        import json
        import numpy as np
        from dsexport.runtime import Engine
        base = {RSS.format(key="VmRSS")}
        engine = Engine.load({str(bundle)!r}, threads={threads}, verify=False, expert_cache_mb={cache_mb!r},
                             cache_policy={policy!r}, prefetch={prefetch!r})
        loaded = {RSS.format(key="VmRSS")}
        r = engine.generate({prompt!r}, max_new_tokens={new_tokens}, ignore_eos=True)
        s = r.paging_stats
        s.pop("expert_histograms")
        print(json.dumps({{"output_ids": r.output_ids, "decode_tokens_per_s": r.decode_tokens_per_s,
                          "prefill_tokens_per_s": r.prefill_tokens_per_s, "stats": s, "rss_before_load": base,
                          "rss_after_load": loaded, "peak_rss": {RSS.format(key="VmHWM")}}}))
    """, threads, holds)


def fused_run(fused: Path, paged: Path, prompt: list[int], paged_ids: list[int], new_tokens: int, threads: int) -> dict:
    """The fused bundle's greedy tokens and speed, then both bundles' logits on the paged tokens."""
    return run_child(f"""
        import json
        import numpy as np
        from dsexport.runtime import Engine
        def logits(engine, ids, steps):
            T = len(ids)
            out, cache = engine.forward(np.array([ids]), np.arange(T)[None], np.ones((1, T), np.int64),
                                        engine.empty_cache(1))
            rows = [out[0, -1]]
            for n, t in enumerate(steps[:-1]):
                mask = np.ones((1, T + n + 1), np.int64)
                out, cache = engine.forward(np.array([[t]]), np.array([[T + n]]), mask, cache)
                rows.append(out[0, -1])
            return np.stack(rows)
        fused = Engine.load({str(fused)!r}, threads={threads}, verify=False)
        r = fused.generate({prompt!r}, max_new_tokens={new_tokens}, ignore_eos=True)
        a = logits(fused, {prompt!r}, {paged_ids!r})
        del fused
        b = logits(Engine.load({str(paged)!r}, threads={threads}, verify=False), {prompt!r}, {paged_ids!r})
        d = np.abs(a - b).max(-1)
        print(json.dumps({{"output_ids": r.output_ids, "decode_tokens_per_s": r.decode_tokens_per_s,
                          "max_logit_diff": float(d.max()), "median_logit_diff": float(np.median(d))}}))
    """, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a paged bundle (build --paged)")
    ap.add_argument("--fused", type=Path, default=None, help="the fused-op (ort-moe) bundle of the same checkpoint")
    ap.add_argument("--fraction", type=float, default=0.25, help="expert cache as a fraction of the routed experts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cold", action="store_true", help="drop the store's page-cache pages before each run")
    ap.add_argument("--precision", choices=("fp32", "int8", "int4"), default=None,
                    help="the store's precision the bundle must have (build --paged --precision)")
    ap.add_argument("--holds", choices=("quantized", "fp32", "both"), default="quantized",
                    help="what the cache holds of a quantized store (both: extra runs holding fp32)")
    args = ap.parse_args()

    from dsexport.runtime.bundle import read_bundle

    paging = read_bundle(args.bundle, verify=False).manifest.paging
    store_precision = paging.precision
    if args.precision and args.precision != store_precision:
        raise SystemExit(f"{args.bundle} stores its experts at {store_precision}, not {args.precision}: build it with "
                         f"--paged --precision {args.precision}")
    total, non_expert = paging.routed_expert_bytes, paging.non_expert_bytes
    cache_mb = total * args.fraction / 2**20
    prompt = [int(x) for x in __import__("numpy").random.default_rng(0).integers(3, 30000, args.prompt_tokens)]
    print(f"{store_precision} store ({paging.scheme or 'float32'}, block {paging.block}, "
          f"activations {paging.activations}); "
          f"routed experts {total / 1e9:.2f} GB in the store, non-expert weights {non_expert / 1e9:.2f} GB "
          f"(segments, memory-mapped); cache {args.fraction:.0%} = {cache_mb:.0f} MiB; {args.prompt_tokens}-token "
          f"prompt, {args.new_tokens} new tokens, {args.threads} threads; store pages "
          f"{'dropped before each run (cold)' if args.cold else 'in the OS page cache (warm)'}")
    holds = "fp32" if args.holds == "fp32" or store_precision == "fp32" else "quantized"
    settings = [("all resident", None, "lfu", False, holds)] + [
        (f"{policy} {'+ prefetch' if prefetch else 'no prefetch'}", cache_mb, policy, prefetch, holds)
        for policy in ("lru", "lfu") for prefetch in (False, True)]
    if args.holds == "both" and store_precision != "fp32":
        settings += [("all resident, holds fp32", None, "lfu", False, "fp32"),
                     ("lfu + prefetch, holds fp32", cache_mb, "lfu", True, "fp32")]
    rows, reference = [], None
    for name, mb, policy, prefetch, held in settings:
        if args.cold:
            drop_page_cache(args.bundle / paging.file)
        r = paged_run(args.bundle, prompt, args.new_tokens, args.threads, mb, policy, prefetch, held)
        reference = reference or r["output_ids"]
        s = r["stats"]
        budget = s["budget_bytes"]
        rows.append([name, "yes" if r["output_ids"] == reference else "NO",
                     f"{s['hit_rate']:.1%}", f"{s['bytes_read_per_token'] / 1e6:.1f} MB",
                     f"{r['decode_tokens_per_s']:.2f}", f"{s['decode']['stall_s']:.2f} s",
                     f"{s['prefetches']['used']}/{s['prefetches']['loaded']}",
                     f"{r['peak_rss'] / 1e9:.2f} GB", f"{(budget + non_expert) / 1e9:.2f} GB",
                     f"{r['rss_before_load'] / 1e9:.2f} GB"])
        print(json.dumps({"setting": name, **{k: v for k, v in r.items() if k != "output_ids"}}), file=sys.stderr)
    header = ["setting", "same tokens", "decode hit rate", "read/token", "decode tok/s", "decode stall",
              "prefetch used/loaded", "peak RSS", "budget + non-expert", "RSS before load"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    if args.fused:
        f = fused_run(args.fused, args.bundle, prompt, reference, args.new_tokens, args.threads)
        tolerance = {"fp32": "parity tolerance 1e-4"}.get(store_precision, "docs/quantization.md: within 1e-3 with "
                                                          "fp32 activations; median <= 1e-4, max <= 0.25 with int8")
        print(f"fused-op bundle: same tokens as paged {'yes' if f['output_ids'] == reference else 'NO'}, "
              f"{f['decode_tokens_per_s']:.2f} decode tok/s; |logit diff| paged vs fused max "
              f"{f['max_logit_diff']:.2e}, median {f['median_logit_diff']:.2e} over {len(reference)} positions "
              f"({tolerance})")


if __name__ == "__main__":
    main()
