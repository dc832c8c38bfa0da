"""CPU decode and prefill against llama.cpp, per precision, in one run: ratios, roofline, step breakdown.

For each precision given (fp32, int8, int4, each with a prebuilt bundle of the checkpoint), the
run alternates --rounds times between a dsexport process (--reps generations) and llama-bench
(--reps repetitions) on the matching GGUF (f32, q8_0, q4_0), so both see the same machine state.
It prints best and median decode and prefill tokens/s of each, the ratios (best/best and
median/median), and roofline fractions:

  roofline = bytes one decoded token reads x tokens/s / bandwidth, against two bandwidths,
  each measured before every precision's rounds and the best of those taken (benchmarks/bandwidth.py):
  read:      2 threads reducing 1 GiB (bytes read per second, best of 5): the ceiling of a
             weight-streaming decode step, which only reads
  copy:      2 threads copying 1 GiB (bytes read + written per second, best of 5): the figure
             the issue's goals were first stated against; 1.3-1.5x the read figure here
  dsexport bytes/token, as the kernels hold the weights: a bundle run by the native decoder
             reads the bundle's own bytes as it holds them (every tensor of the manifest's native
             section, one embedding row, and per MoE layer its router and k experts' bytes; block
             scales that are fp16 values at 2 bytes: int4 block 32 = 0.5625 bytes/weight, with
             float32 scales 0.625); a graph run by ONNX Runtime, its repacked
             MatMulNBits/QMoE blocks (float32 scale + float32 block sum per block: core/quant.py
             weight_bytes with resident=True), fp32 for the embeddings' one row, norms, router and
             the absorbed W_UK/W_UV
  llama.cpp bytes/token: from the GGUF's tensor table (benchmarks/llamacpp.py gguf_bytes_per_token):
             every tensor whole, the routed experts' k of E, one embedding row. Before 2026-12-02
             (run 20) it was the file size x active/total parameters, which counted the output head
             at the active fraction: q4_0 M 116.1 MB against the table's 125.2 (q8_0 216.2 against
             217.9; f32 812.1 against 812.0)

and, for dsexport, a per-step breakdown of one extra decode (ms per token): ONNX Runtime session
runs, the routed experts (native kernel or numpy), the native decoder's call with its parts
(projections, latent attention, routed experts, head, its serial work), and the rest (Python:
feeds, numpy views, sampling, the decode loop). A greedy decode on the native decoder runs its
steps in C in bursts of ~50 ms (runtime/decode.py), and so does the breakdown. Weights are in memory for both (dsexport weights="memory", the
expert store read into RAM; llama-bench --load-mode none).

    python benchmarks/decode_cpu.py --checkpoint /tmp/ckpt-m \
        --bundle fp32=/tmp/m/fp32 --bundle int8=/tmp/m/int8 --bundle int4=/tmp/m/int4 \
        [--bundle int4=/tmp/m/paged-int4] [--onnxruntime] [--numpy-experts]

Several bundles may be given per precision (a fused and a paged one): each is run in every round.

Warmup: llama-bench runs the whole prompt and one generated token before its timed repetitions
and does not count them; each dsexport process does the same (one generation of the prompt and 2
tokens, not counted). Before 2026-12-02 (session 26) it did not, and each process's first prompt
was counted: in run 14 (fp32 M) those ran at 156, 185 and 173 tok/s, the later ones at 151-238
(median 222; benchmarks/results/decode_cpu-m-fused-native-run14.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import copy_bandwidth, read_bandwidth  # noqa: E402
from decode import run_child  # noqa: E402
from llamacpp import build_llamacpp, convert, gguf_bytes_per_token, llama_bench, wait_idle  # noqa: E402

from dsexport.core import quant  # noqa: E402
from dsexport.runtime.bundle import read_bundle  # noqa: E402

GGUF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def bytes_read_per_token(bundle: Path, experts: str = "native") -> tuple[float, str]:
    """Weight bytes one decoded token reads, as the kernels that run this bundle hold them."""
    manifest = read_bundle(bundle, verify=False).manifest
    cfg, spec = manifest.model, manifest.quantization
    _, active = quant.weight_bytes(cfg, spec, resident=True)
    paging = manifest.paging
    from dsexport.runtime import native
    if manifest.native is not None and experts == "native" and native.load() is not None:
        return native_bytes_per_token(manifest, bundle), ("native decoder: the bundle's own bytes (MatMulNBits rows, "
                                                          "experts), fp16-valued block scales and W_UK/W_UV at 2 bytes")
    if paging is None:
        return active, "fused graph (ONNX Runtime's repacked blocks)"
    if experts == "numpy" or native.load() is None:
        return active, "paged, numpy experts" + (" (dequantized per use: more than this is touched)" if paging.bits else "")
    k = cfg.num_experts_per_tok
    for layer, entry in paging.layers.items():
        ids = cfg.expert_ids(layer)
        resident = sum(quant.expert_bytes(cfg, spec, layer, e, resident=True) for e in ids) / len(ids)
        active += k * (entry.record_bytes - resident)
    return active, "paged, native experts at the store's record bytes"


def native_bytes_per_token(manifest, bundle: Path) -> float:
    """What the native decoder reads per token: every tensor of the native section as it holds it,
    one embedding row, and per MoE layer the router, its bias and k experts. Block scales count 2
    bytes where the decoder holds them as fp16 (AVX2 panels, every scale of the matrix, or of the
    layer's experts, an fp16 value: int4 block 32 = 0.5625 bytes/weight), else 4, and W_UK/W_UV
    count 2 bytes per weight where they are fp16 values (a quantized bundle's), 8-bit rows whose
    values fit 6 bits (a 6-bit head) 0.75 bytes per weight (the AVX2 build's 6-bit panels); a paged
    store's records are taken to hold fp16 values (as this exporter writes them), not read."""
    from dsexport.core.sections import TensorRef
    from dsexport.runtime import native
    from dsexport.runtime.native_backend import fits_six_bits, half_scales

    lib = native.load()
    half = lib.dsx_simd() == 1 and lib.dsx_half_scales() == 1

    def scale_bytes(*refs, fold: float = 1.0) -> int:
        arrays = [np.fromfile(bundle / r.file, np.float32, r.bytes // 4, offset=r.offset) for r in refs]
        fp16 = half and all(half_scales(a / np.float32(f)) is not None
                            for a, f in zip(arrays, (1.0, fold) if len(arrays) == 2 else (1.0,)))
        return sum(r.bytes // 2 if fp16 else r.bytes for r in refs)

    section, cfg = manifest.native, manifest.model
    refs = []
    for role, value in [*section.globals.items(), *((r, v) for layer in section.layers.values()
                                                     for r, v in layer.roles.items())]:
        if role == "embed":
            continue
        if isinstance(value, TensorRef):
            fp16 = role in ("w_uk", "w_uv") and half and np.array_equal(
                (a := np.fromfile(bundle / value.file, np.float32, value.bytes // 4, offset=value.offset))
                .astype(np.float16).astype(np.float32), a)  # held as fp16 (runtime/native_backend.py _absorbed)
            refs.append(value.bytes // 2 if fp16 else value.bytes)
        else:  # an fp32 weight shared with the router (col_start) counts only its own columns
            panels = value.activations == "int8" and value.block == 32
            weight = value.weight.bytes
            if panels and value.bits == 8 and lib.dsx_simd() == 1 and fits_six_bits(
                    np.fromfile(bundle / value.weight.file, np.uint8, weight, offset=value.weight.offset)):
                weight = weight * 6 // 8  # 8-bit rows of 6-bit levels, held as 6-bit panels
            refs.append(value.rows * value.cols * 4 if value.bits == 32 else weight + (
                scale_bytes(value.scales) if panels else value.scales.bytes))
            refs.append(value.bias.bytes if value.bias else 0)
    total = sum(refs) + cfg.hidden_size * 4
    k = cfg.num_experts_per_tok
    if manifest.paging is None:  # a fused bundle: the op's experts (all shards) / E per expert, and the router
        for i, layer in section.layers.items():
            r = layer.routed
            if r is not None:
                E = cfg.num_experts(i)
                scales = scale_bytes(r.fc1_scales, r.fc2_scales, fold=r.fold) if r.fc1_scales and r.block == 32 \
                    and r.activations == "int8" else sum(x.bytes for x in (r.fc1_scales, r.fc2_scales) if x)
                total += k * (r.fc1.bytes + r.fc2.bytes + scales) // E
                total += E * cfg.hidden_size * 4 + (r.bias.bytes if r.bias else 0)
        return total
    spec = manifest.quantization
    for entry in manifest.paging.layers.values():
        record = entry.record_bytes
        if half and entry.quantized and spec.activations == "int8" and all(
                m.block == 32 for m in entry.quantized.values()):  # the store's scales, taken as fp16 values
            g, d = entry.quantized["gate_up"], entry.quantized["down"]
            record -= (2 * entry.intermediate * g.padded // 32 + entry.hidden * d.padded // 32) * 2
        total += k * record + entry.experts * entry.hidden * 4
        total += entry.experts * 4 if entry.bias is not None else 0
    return total


def dsexport_child(bundle: Path, prompt: list[int], new_tokens: int, threads: int, reps: int,
                   experts: str = "native") -> dict:
    return run_child(f"""
        import json, time
        import numpy as np
        from dsexport.runtime import Engine, native
        engine = Engine.load({str(bundle)!r}, threads={threads}, weights="memory", verify=False)
        engine.generate({prompt!r}, max_new_tokens=2, ignore_eos=True)  # warmup, as llama-bench's (not counted)
        runs = [engine.generate({prompt!r}, max_new_tokens={new_tokens}, ignore_eos=True) for _ in range({reps})]
        # the breakdown: the raw decode step after a prefill, as generate() runs it greedily: the
        # native decoder's C loop in bursts (runtime/decode.py), else engine.forward and argmax per step
        from dsexport.runtime.decode import GREEDY_BURST_S, GREEDY_BURST_STEPS
        backend, prompt, T = engine.backend, {prompt!r}, {len(prompt)}
        logits, cache = engine.forward(np.array([prompt]), np.arange(T)[None], np.ones((1, T), np.int64),
                                       engine.empty_cache(1))
        token = int(logits[0, -1].argmax())
        backend.profile = {{}}
        greedy, bursts, n, burst = getattr(backend, "greedy", None), 0, 0, 4
        t0 = time.perf_counter()
        while n < {new_tokens} - 1:
            if greedy is not None:
                start = time.perf_counter()
                tokens, cache = greedy(token, T + n, cache, min(burst, {new_tokens} - 1 - n), ())
                token, n, bursts = tokens[-1], n + len(tokens), bursts + 1
                burst = int(min(GREEDY_BURST_STEPS, max(1, GREEDY_BURST_S * len(tokens) / (time.perf_counter() - start))))
                continue
            logits, cache = engine.forward(np.array([[token]]), np.array([[T + n]]), np.ones((1, T + n + 1), np.int64),
                                           cache)
            token, n = int(logits[0, -1].argmax()), n + 1
        total = time.perf_counter() - t0
        print(json.dumps({{"decode": [x.decode_tokens_per_s for x in runs], "prefill": [x.prefill_tokens_per_s for x in runs],
                          "profile": dict(backend.profile), "profile_total_s": total, "steps": {new_tokens} - 1,
                          "bursts": bursts,
                          "kernel": native.status(), "backend": backend.name, "output_ids": runs[0].output_ids}}))
    """, env={"OMP_NUM_THREADS": str(threads), "DSEXPORT_EXPERT_KERNEL": "numpy" if experts == "numpy" else "native",
              "DSEXPORT_DECODER": "onnxruntime" if experts in ("numpy", "segments") else "native"})


def summary(values: list[float]) -> tuple[float, float]:
    return max(values), statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--bundle", action="append", required=True, help="PRECISION=DIR (fp32, int8 or int4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--numpy-experts", action="store_true",
                    help="also run each paged bundle with numpy routed experts (DSEXPORT_EXPERT_KERNEL=numpy)")
    ap.add_argument("--segments", "--onnxruntime", dest="segments", action="store_true",
                    help="also run each bundle on ONNX Runtime: a paged bundle's segment graphs (+ the expert "
                         "kernel), a fused bundle's graph")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bundles: dict[str, list] = {}  # precision -> [(label, bundle, experts)]
    for spec in args.bundle:
        precision, path = spec.split("=", 1)
        label = Path(path).name
        bundles.setdefault(precision, []).append((label, Path(path), "native"))
        if args.numpy_experts and (Path(path) / "experts.bin").exists():
            bundles[precision].append((label + " (numpy experts)", Path(path), "numpy"))
        if args.segments:
            paged = (Path(path) / "experts.bin").exists()
            bundles[precision].append((label + (" (segments)" if paged else " (onnxruntime)"), Path(path), "segments"))

    llama = build_llamacpp()
    ggufs = convert(args.checkpoint, llama, [GGUF[p] for p in bundles])
    from llamacpp import active_fraction
    fraction = active_fraction(args.checkpoint)
    measured = {"read": [], "copy": []}  # before each precision; the best of each is the denominator

    def measure() -> None:
        wait_idle()
        measured["read"].append(read_bandwidth(args.threads))
        measured["copy"].append(copy_bandwidth(args.threads))
        print(f"memory bandwidth ({args.threads} threads, 1 GiB, best of 5): read {measured['read'][-1] / 1e9:.1f} GB/s, "
              f"copy (read + write) {measured['copy'][-1] / 1e9:.1f} GB/s", flush=True)

    results, rows = {}, {}
    for precision, paths in bundles.items():
        measure()
        gguf = ggufs[GGUF[precision]]
        runs = {"llama.cpp": {"decode": [], "prefill": []}}
        runs.update({label: {"decode": [], "prefill": [], "profiles": []} for label, _, _ in paths})
        for _ in range(args.rounds):
            for label, bundle, experts in paths:
                manifest = read_bundle(bundle, verify=False).manifest
                prompt = np.random.default_rng(0).integers(3, min(manifest.model.vocab_size, 300),
                                                           size=args.prompt_tokens).tolist()
                wait_idle()
                d = dsexport_child(bundle, prompt, args.new_tokens, args.threads, args.reps, experts)
                runs[label]["decode"] += d["decode"]
                runs[label]["prefill"] += d["prefill"]
                runs[label]["profiles"].append(d)
            wait_idle()
            lc = llama_bench(llama, gguf, args.threads, args.prompt_tokens, args.new_tokens, args.reps)
            runs["llama.cpp"]["decode"] += lc["decode_runs"]
            runs["llama.cpp"]["prefill"] += lc["prefill_runs"]
        their_bytes, their_split = gguf_bytes_per_token(gguf, llama)
        (td, tdm), (tp, tpm) = summary(runs["llama.cpp"]["decode"]), summary(runs["llama.cpp"]["prefill"])
        print(f"\n== {precision} vs llama.cpp {GGUF[precision]}: {args.threads} threads, {args.rounds} rounds "
              f"(alternating) x {args.reps} reps, prompt {args.prompt_tokens}, {args.new_tokens} new tokens")
        print(f"llama.cpp {GGUF[precision]}: decode best {td:.1f} median {tdm:.1f} tok/s; prefill best {tp:.0f} median "
              f"{tpm:.0f} tok/s; runs {', '.join(f'{x:.1f}' for x in runs['llama.cpp']['decode'])}")
        print(f"  bytes per decoded token: {their_bytes / 1e6:.1f} MB (the GGUF's tensors: output head "
              f"{their_split.get('output', 0) / 1e6:.1f}, routed experts "
              f"{sum(v for k, v in their_split.items() if k.endswith('_exps')) / 1e6:.1f}; file x active fraction "
              f"would say {gguf.stat().st_size * fraction / 1e6:.1f})")
        rows[f"{precision}: llama.cpp {GGUF[precision]}"] = (their_bytes, td, tdm)
        results[precision] = {"llama_cpp": runs["llama.cpp"], "llama_bytes_per_token": their_bytes, "dsexport": {}}
        for label, bundle, experts in paths:
            r = runs[label]
            (od, odm), (op, opm) = summary(r["decode"]), summary(r["prefill"])
            our_bytes, how = bytes_read_per_token(bundle, experts)
            last = r["profiles"][-1]
            if last["backend"] == "native":
                where = f"native decoder ({last['kernel']['simd']})"
            elif last["backend"] != "onnxruntime-paged":
                where = "ONNX Runtime's MoE/QMoE (fused graph)"
            elif experts == "numpy" or last["kernel"]["routed_experts"] == "numpy":
                where = "numpy"
            else:
                where = f"native kernel ({last['kernel']['simd']})"
            print(f"dsexport {label} ({last['backend']}, routed experts: {where}): "
                  f"decode best {od:.1f} median {odm:.1f} tok/s; prefill best {op:.0f} median {opm:.0f} tok/s; "
                  f"runs {', '.join(f'{x:.1f}' for x in r['decode'])}")
            print(f"  ratio to llama.cpp: decode {od / td:.2f}x best/best, {odm / tdm:.2f}x median/median; "
                  f"prefill {op / tp:.2f}x, {opm / tpm:.2f}x")
            print(f"  bytes per decoded token: {our_bytes / 1e6:.1f} MB ({how})")
            rows[f"{precision}: dsexport {label}"] = (our_bytes, od, odm)
            best = min(r["profiles"], key=lambda p: p["profile_total_s"])
            steps = best["steps"]
            per = {k: v / steps * 1e3 for k, v in best["profile"].items()}
            total = best["profile_total_s"] / steps * 1e3
            inside = per.pop("kernel", None)
            parts = {k[len("native: "):]: per.pop(k) for k in list(per) if k.startswith("native: ")}  # inside "native"
            other = total - sum(per.values())
            how = f"in {best['bursts']} calls of the C greedy loop" if best.get("bursts") else "engine.forward steps"
            print("  decode step (ms, fastest round, {} steps after the prompt, {}): total {:.2f} = {}{}{} + "
                  "Python/numpy/argmax {:.2f}".format(
                      steps, how, total, " + ".join(f"{k} {v:.2f}" for k, v in per.items()),
                      f" (native kernel itself {inside:.2f})" if inside else "",
                      " (" + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + ")" if parts else "", other))
            per.update({f"native: {k}": v for k, v in parts.items()})
            results[precision]["dsexport"][label] = {"bundle": str(bundle), "experts": experts, "decode": r["decode"],
                                                     "prefill": r["prefill"], "bytes_per_token": our_bytes,
                                                     "profile_ms": per, "step_ms": total}
    read, copy = max(measured["read"]), max(measured["copy"])
    print(f"\n== roofline: MB read per token x decode tok/s / bandwidth; read {read / 1e9:.1f} GB/s (best of "
          f"{', '.join(f'{b / 1e9:.1f}' for b in measured['read'])}), copy {copy / 1e9:.1f} GB/s (best of "
          f"{', '.join(f'{b / 1e9:.1f}' for b in measured['copy'])})")
    rooflines = {}
    for name, (nbytes, best, median) in rows.items():
        rooflines[name] = {"read": [nbytes * best / read, nbytes * median / read],
                           "copy": [nbytes * best / copy, nbytes * median / copy]}
        print(f"{name}: {nbytes / 1e6:.1f} MB x {best:.1f} tok/s = {nbytes * best / 1e9:.1f} GB/s; of read "
              f"{nbytes * best / read:.2f} (median {nbytes * median / read:.2f}), of copy {nbytes * best / copy:.2f} "
              f"(median {nbytes * median / copy:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": {"read": read, "copy": copy, "measured": measured},
                                         "threads": args.threads, "rooflines": rooflines, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
