"""Compare a bundle's TensorRT engines with its ONNX graphs run by ONNX Runtime, on the device.

Run after `dsexport engine BUNDLE` (docs/engine.md). On the golden prompts stored in the bundle
(golden.json), teacher-forced, it prints the largest |logit difference| between the two
backends, how often their greedy (argmax) tokens agree, and each backend's free-running greedy
continuation; then decode tokens/s of both. A disagreement counts only where ONNX Runtime's
top-2 logit gap is wider than --tie-gap (default 2e-3 for fp32 engines, 0.1 otherwise): a closer
pair is a near-tie that reduced precision may legitimately resolve the other way.

    python benchmarks/compare_trt_ort.py dist/mymodel [--threads 6] [--decode-tokens 64] [--json]

Exit code 0: greedy tokens agree up to near-ties; 1: they differ beyond them; 2: bad input.
ONNX Runtime runs on the CPU here (the bundle's reference path), with its own copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dsexport.core.errors import UserError
from dsexport.runtime import Engine
from dsexport.runtime.golden import load_golden
from dsexport.runtime.validate import match_length, teacher_forced_logits
from dsexport.table import format_table


def top2_gap(logits: np.ndarray) -> np.ndarray:
    top = np.sort(logits, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


def compare_case(ort: Engine, trt: Engine, prompt: list[int], output: list[int], tie_gap: float) -> dict:
    n = len(prompt)
    a = teacher_forced_logits(ort, prompt + output)[n - 1:-1]  # the positions that predict `output`
    b = teacher_forced_logits(trt, prompt + output)[n - 1:-1]
    same = a.argmax(-1) == b.argmax(-1)
    near = top2_gap(a) <= tie_gap
    ort_ids = ort.generate(prompt, max_new_tokens=len(output), ignore_eos=True).output_ids
    trt_ids = trt.generate(prompt, max_new_tokens=len(output), ignore_eos=True).output_ids
    k = match_length(ort_ids, trt_ids)
    greedy = "equal"
    if k < len(ort_ids):
        gap = float(top2_gap(teacher_forced_logits(ort, prompt + ort_ids)[n - 1 + k]))
        greedy = f"near-tie at {k} (gap {gap:.3g})" if gap <= tie_gap else f"differs at {k} (gap {gap:.3g})"
    return {"positions": len(output), "max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_agree": int(same.sum()), "near_ties": int((~same & near).sum()),
            "disagree": int((~same & ~near).sum()), "greedy": greedy}


def decode_speed(engine: Engine, prompt: list[int], tokens: int, runs: int = 3) -> float:
    engine.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up: allocations, profiles, caches
    return max(engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True).decode_tokens_per_s
               for _ in range(runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--tie-gap", type=float, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        ort = Engine.load(args.bundle, threads=args.threads)
        trt = Engine.load(args.bundle, backend="tensorrt")
        golden = load_golden(ort)
        if golden is None:
            raise UserError(f"{args.bundle}: no golden.json to compare on")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engines = trt.manifest.engines
    precision = engines.precision if engines else trt.manifest.precision
    tie_gap = args.tie_gap if args.tie_gap is not None else (2e-3 if precision == "fp32" else 0.1)

    cases = [compare_case(ort, trt, c.prompt_ids, c.output_ids, tie_gap) for c in golden.cases]
    prompt = golden.cases[0].prompt_ids
    speed = {"onnxruntime": decode_speed(ort, prompt, args.decode_tokens),
             "tensorrt": decode_speed(trt, prompt, args.decode_tokens)}
    failed = any(c["disagree"] or c["greedy"].startswith("differs") for c in cases)
    summary = {"bundle": str(args.bundle), "tensorrt": engines.tensorrt_version if engines else None,
               "gpu": engines.gpu if engines else None,
               "precision": precision, "tie_gap": tie_gap,
               "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in cases),
               "argmax_agreement": sum(c["argmax_agree"] for c in cases) / sum(c["positions"] for c in cases),
               "near_ties": sum(c["near_ties"] for c in cases), "cases": cases,
               "decode_tokens_per_s": speed, "passed": not failed}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        rows = [[i, c["positions"], f"{c['max_abs_logit_diff']:.3g}", f"{c['argmax_agree']}/{c['positions']}",
                 c["near_ties"], c["greedy"]] for i, c in enumerate(cases)]
        print(format_table(["case", "tokens", "max |diff|", "argmax agree", "near-ties", "greedy"], rows,
                           align_right={1, 2, 3, 4}))
        print(f"\nTensorRT {summary['tensorrt']} on {summary['gpu']}, {precision}: max |logit diff| "
              f"{summary['max_abs_logit_diff']:.3g}, argmax agreement {summary['argmax_agreement']:.3f} "
              f"(near-ties within {tie_gap:g}: {summary['near_ties']})")
        print(f"decode ({args.decode_tokens} tokens, best of 3): ONNX Runtime {speed['onnxruntime']:.1f} tok/s, "
              f"TensorRT {speed['tensorrt']:.1f} tok/s")
        print("PASS" if not failed else "FAIL: greedy tokens differ beyond near-ties")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
