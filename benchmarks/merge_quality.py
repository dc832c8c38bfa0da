"""Drop vs merge: the perplexity cost of removing routed experts, by how the removed ones are handled.

    python benchmarks/merge_quality.py [--model CKPT] [--samples 128] [--seq-len 256] [--json out.json]

Calibrates on each training corpus of the embedded model and on both mixed (English: KJV
chapters, code: Python's standard library; src/dsexport/assets/deepseek-tiny.work/data), removes
25% and 50% of routed experts by output-mass (global scope), and evaluates the reference model
with the experts dropped (`--prune-method drop`) or merged into the kept ones
(`--prune-method merge`, calibration/merging.py) on the held-out test splits that ship beside
the checkpoint (test.english.txt, test.code.txt), in-domain and cross-domain. The reference with
the plan applied is what the bundle computes (tests/test_pruning.py, tests/test_merge.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dsexport import EMBEDDED_MODEL
from dsexport.calibration.merging import plan_merges
from dsexport.calibration.pruning import PruneConfig, plan_pruning
from dsexport.calibration.run import calibrate
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime.tokenizer import BundleTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization_quality import perplexity  # noqa: E402

CORPORA = EMBEDDED_MODEL.parent / "deepseek-tiny.work" / "data"
DOMAINS = ("english", "code")
CALIBRATIONS = {"english": ["english"], "code": ["code"], "mixed": ["english", "code"]}
FRACTIONS = (0.25, 0.5)


def windows(model: Path, domain: str, seq_len: int) -> torch.Tensor:
    ids = BundleTokenizer.from_directory(model).encode((model / f"test.{domain}.txt").read_text())
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    reader = CheckpointReader(args.model)
    test = {d: windows(args.model, d, args.seq_len) for d in DOMAINS}
    base = {d: perplexity(DeepseekReference.from_checkpoint(reader), test[d]) for d in DOMAINS}
    print(f"{args.model}: fp32 perplexity " + ", ".join(f"{d} {p:.3f}" for d, p in base.items()), flush=True)
    rows = []
    for calib, parts in CALIBRATIONS.items():
        t0 = time.perf_counter()
        profile = calibrate(args.model, [CORPORA / f"{d}.train.txt" for d in parts], args.samples, args.seq_len)
        print(f"calibrated on {calib} in {time.perf_counter() - t0:.0f} s", flush=True)
        for fraction in FRACTIONS:
            plan = plan_pruning(reader.config, profile, PruneConfig(fraction, "output-mass", "global"))
            pruned = reader.with_config(reader.config.with_kept_experts(plan.kept))
            t0 = time.perf_counter()
            merged = pruned.with_merges(plan_merges(pruned, plan.to_record(profile), profile).merges)
            merge_s = time.perf_counter() - t0
            for method, view in (("drop", pruned), ("merge", merged)):
                model = DeepseekReference.from_checkpoint(view)
                for evald in DOMAINS:
                    ppl = perplexity(model, test[evald])
                    row = {"calibrated_on": calib, "evaluated_on": evald, "fraction": fraction, "method": method,
                           "ppl": ppl, "delta": ppl / base[evald] - 1, "merge_seconds": merge_s}
                    rows.append(row)
                    print(f"calib {calib:7s} eval {evald:7s} {fraction:4.2f} {method:5s}: ppl {ppl:8.3f} "
                          f"({row['delta']:+.2%})", flush=True)
    print(f"\n{'calibrated':10s} {'evaluated':9s} " + "  ".join(f"{m:>5s} {f:.2f}" for f in FRACTIONS
                                                            for m in ("drop", "merge")))
    for calib in CALIBRATIONS:
        for evald in DOMAINS:
            cells = [next(r for r in rows if (r["calibrated_on"], r["evaluated_on"], r["fraction"], r["method"]) ==
                          (calib, evald, f, m))["delta"] for f in FRACTIONS for m in ("drop", "merge")]
            print(f"{calib:10s} {evald:9s} " + "  ".join(f"{c:+10.2%}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "baseline_ppl": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
