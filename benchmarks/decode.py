"""Build a bundle from a checkpoint and measure it against transformers, all in one run.

Prints: build time and peak RSS (vs checkpoint size on disk), prefill and decode tokens/s,
time to first token, peak RSS of generation, transformers eager decode tokens/s and the ratio,
and the roofline fraction = weight bytes read per decoded token x tokens/s / memory bandwidth,
where bandwidth is a 2-thread copy of 1 GiB (bytes read + written per second, best of 5)
measured in the same run. Each system runs in its own process (peak RSS is per process, the
model is never held twice); weights are resident: dsexport locks its mapped weights in RAM
(weights="mlock", falling back to "memory"), transformers holds them as tensors.

    python benchmarks/make_checkpoint_m.py /tmp/ckpt-m
    python benchmarks/decode.py --checkpoint /tmp/ckpt-m --bundle /tmp/bundle-m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from dsexport.runtime.bundle import read_bundle
from bandwidth import copy_bandwidth

HWM = 'int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024'


def run_child(code: str, env: dict | None = None) -> dict:
    """Run code in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build(checkpoint: Path, bundle: Path, precision: str = "fp32") -> dict:
    return run_child(f"""
        import json, time
        from pathlib import Path
        from dsexport.build import BuildConfig, build_bundle
        t0 = time.perf_counter()
        build_bundle(BuildConfig(Path({str(checkpoint)!r}), Path({str(bundle)!r}), precision={precision!r},
                                 overwrite=True))
        print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss": {HWM}}}))
    """)


def dsexport_generate(bundle: Path, prompt: list[int], new_tokens: int, threads: int, runs: int) -> dict:
    return run_child(f"""
        import json
        from dsexport.core.errors import UserError
        from dsexport.runtime import Engine
        try:
            engine, mode = Engine.load({str(bundle)!r}, threads={threads}, weights="mlock", verify=False), "mlock"
        except UserError:
            engine, mode = Engine.load({str(bundle)!r}, threads={threads}, weights="memory", verify=False), "memory"
        runs = [engine.generate({prompt!r}, max_new_tokens={new_tokens}, ignore_eos=True) for _ in range({runs})]
        best = max(runs, key=lambda r: r.decode_tokens_per_s)
        print(json.dumps({{"decode_tokens_per_s": best.decode_tokens_per_s,
                          "decode_runs": [r.decode_tokens_per_s for r in runs],
                          "prefill_tokens_per_s": max(r.prefill_tokens_per_s for r in runs),
                          "ttft_s": min(r.ttft_s for r in runs), "weights": mode,
                          "output_ids": best.output_ids, "peak_rss": {HWM}}}))
    """, env={"OMP_NUM_THREADS": str(threads)})


def transformers_generate(checkpoint: Path, prompt: list[int], new_tokens: int, threads: int, runs: int) -> dict:
    return run_child(f"""
        import json, time, torch
        from transformers import AutoModelForCausalLM, DynamicCache
        torch.set_num_threads({threads})
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        ids = torch.tensor([{prompt!r}])
        results = []
        with torch.inference_mode():
            for _ in range({runs}):
                cache = DynamicCache(config=model.config)
                t0 = time.perf_counter()
                out = model(ids, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                tokens = [int(token)]
                for _ in range({new_tokens} - 1):
                    out = model(token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(token))
                t2 = time.perf_counter()
                results.append(({new_tokens} - 1) / (t2 - t1))
        print(json.dumps({{"decode_tokens_per_s": max(results), "decode_runs": results,
                          "experts_implementation": str(getattr(model.config, "_experts_implementation", "default")),
                          "output_ids": tokens, "peak_rss": {HWM}}}))
    """, env={"OMP_NUM_THREADS": str(threads)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-build", action="store_true", help="reuse an existing bundle")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"],
                    help="bundle precision; int8/int4 are compared with llama.cpp q8_0/q4_0 (--llamacpp)")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also build and run llama.cpp on the same checkpoint (benchmarks/llamacpp.py)")
    args = ap.parse_args()

    ckpt_bytes = sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    bandwidth = copy_bandwidth(args.threads)
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s ({args.threads}-thread copy of 1 GiB, read + write, best of 5)")

    if not args.skip_build:
        b = build(args.checkpoint, args.bundle, args.precision)
        print(f"build: {b['seconds']:.1f} s, peak RSS {b['peak_rss'] / 1e9:.2f} GB = "
              f"{b['peak_rss'] / ckpt_bytes:.2f}x the checkpoint ({ckpt_bytes / 1e9:.2f} GB on disk)")
    manifest = read_bundle(args.bundle, verify=False).manifest
    bytes_per_token = manifest.stats.decode_weight_bytes_per_token
    vocab = manifest.model.vocab_size
    prompt = np.random.default_rng(0).integers(3, min(vocab, 300), size=args.prompt_tokens).tolist()

    ours = dsexport_generate(args.bundle, prompt, args.new_tokens, args.threads, args.runs)
    roofline = bytes_per_token * ours["decode_tokens_per_s"] / bandwidth
    print(f"dsexport ({ours['weights']} weights): decode {ours['decode_tokens_per_s']:.1f} tok/s "
          f"(runs {', '.join(f'{x:.1f}' for x in ours['decode_runs'])}), prefill {ours['prefill_tokens_per_s']:.0f} tok/s "
          f"for {args.prompt_tokens} tokens, TTFT {ours['ttft_s'] * 1e3:.0f} ms, peak RSS {ours['peak_rss'] / 1e9:.2f} GB")
    print(f"roofline: {bytes_per_token / 1e6:.0f} MB of weights per decoded token x "
          f"{ours['decode_tokens_per_s']:.1f} tok/s / {bandwidth / 1e9:.1f} GB/s = {roofline:.2f}")
    if not args.skip_transformers:
        hf = transformers_generate(args.checkpoint, prompt, args.new_tokens, args.threads, args.runs)
        hf_roofline = bytes_per_token * hf["decode_tokens_per_s"] / bandwidth
        same = sum(a == b for a, b in zip(hf["output_ids"], ours["output_ids"]))
        print(f"transformers eager: decode {hf['decode_tokens_per_s']:.1f} tok/s "
              f"(runs {', '.join(f'{x:.1f}' for x in hf['decode_runs'])}), roofline {hf_roofline:.2f}, "
              f"peak RSS {hf['peak_rss'] / 1e9:.2f} GB")
        print(f"ratio dsexport / transformers decode: {ours['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x; "
              f"greedy tokens equal: {same}/{len(hf['output_ids'])}")
    if args.llamacpp:
        from llamacpp import run_llamacpp

        quant = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}[args.precision]
        lc = run_llamacpp(args.checkpoint, quants=(quant,), threads=args.threads, prompt=args.prompt_tokens,
                          gen=args.new_tokens, reps=args.runs)
        print(f"llama.cpp: {json.dumps(lc)}")


if __name__ == "__main__":
    main()
