"""What distillation recovers of expert pruning's perplexity cost (`dsexport distill`, issue 16).

    nice python benchmarks/distill_quality.py [--model DIR] [--fractions 0.25 0.5]
        [--modes router norms moe] [--methods drop merge] [--calib english code mixed]
        [--samples 256] [--seq-len 256]
        [--eval-samples 64] [--threads 1] [--out benchmarks/results/distill-embedded.txt]

For each calibration set (English, code, or both mixed; the training corpora of the embedded
model, as benchmarks/pruning_quality.py finds them), one calibration profile (`dsexport
calibrate`), then for each fraction of routed experts removed (output-mass, global scope) and
each --train mode and --prune-method one `dsexport distill` run in its own process, so its wall time and peak RSS
are its own. Quality is measured on the held-out test splits beside the model
(test.english.txt, test.code.txt; the embedded model's when --model has none): perplexity of
the pruned student before and after distillation relative to the original fp32 model, on the
calibration domain (in-domain) and the other (cross-domain). Prints a table as each run ends
and checks the goals of issue 16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning_quality import DOMAINS, train_corpora  # noqa: E402

from dsexport import EMBEDDED_MODEL  # noqa: E402

CALIB_SETS = {"english": ("english",), "code": ("code",), "mixed": ("english", "code")}
HEADERS = ("calib", "removed", "method", "train", "eval", "ppl fp32", "no recovery", "after", "gap closed", "KL before",
           "KL after", "steps", "best", "distill s", "run s", "cpu s", "peak RSS MiB")


def dsexport(*args: str, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", "from dsexport.cli import main; main()", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dsexport {' '.join(map(str, args[:2]))} failed:\n{proc.stderr[-3000:]}")
    return proc


def rows_of(run: dict, report: dict, tests: dict[str, Path]) -> list[list]:
    rows = []
    for domain, path in tests.items():
        q = report["quality"][str(path)]
        gap = q["gap_closed"]
        rows.append([run["calib"], f"{run['fraction']:.0%}", run["method"], run["train"], domain + (" (in)" if domain in
                     CALIB_SETS[run["calib"]] else " (cross)"), f"{q['ppl_teacher']:.3f}",
                     f"{q['before']['ppl_delta']:+.2%}", f"{q['after']['ppl_delta']:+.2%}",
                     "-" if gap is None else f"{gap:+.0%}", f"{q['before']['kl']:.4f}", f"{q['after']['kl']:.4f}",
                     report["steps"], report["best_step"], f"{report['seconds']:.0f}", f"{run['wall_s']:.0f}",
                     f"{report['cpu_seconds']:.0f}", f"{report['peak_rss_bytes'] / 2**20:.0f}"])
    return rows


def table(rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
    line = lambda r: "  ".join(str(c).rjust(w) if i > 4 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(HEADERS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def goals(runs: list[dict], tests: dict[str, Path]) -> list[str]:
    """Issue 16's goals for this model, each with the numbers that decide it."""
    def q(run, domain):
        return run["report"]["quality"][str(tests[domain])]

    out = []
    half = [r for r in runs if r["fraction"] == 0.5 and r["calib"] in ("english", "code")]
    for r in (r for r in half if r["train"] == "moe"):
        d = q(r, r["calib"])["after"]["ppl_delta"]
        out.append(f"50% removed ({r['method']}), {r['calib']} calibration, --train moe, in-domain after recovery "
                   f"{d:+.2%} (goal <= +0.7%): {'met' if d <= 0.007 else 'NOT met'}")
    for r in (r for r in runs if r["calib"] == "mixed" and r["fraction"] == 0.5 and r["train"] == "moe"):
        worst = max(q(r, d)["after"]["ppl_delta"] for d in DOMAINS)
        out.append(f"50% removed ({r['method']}), mixed calibration, --train moe, worse domain {worst:+.2%} "
                   f"(goal <= +2%): "
                   f"{'met' if worst <= 0.02 else 'NOT met'}")
    for r in (r for r in runs if r["train"] == "norms"):
        gap = q(r, CALIB_SETS[r["calib"]][0])["gap_closed"]
        out.append(f"router+norms, {r['method']}, {r['calib']} {r['fraction']:.0%}: gap closed in-domain "
                   f"{'-' if gap is None else f'{gap:+.0%}'} (goal >= 20%): "
                   f"{'met' if gap is not None and gap >= 0.2 else 'NOT met'}")
    crossed = [(r, d) for r in runs for d in DOMAINS if d not in CALIB_SETS[r["calib"]]]
    worse = [(r, d) for r, d in crossed if q(r, d)["after"]["ppl"] > q(r, d)["before"]["ppl"]]
    out.append(f"cross-domain never worse than without recovery: {len(crossed) - len(worse)}/{len(crossed)} runs "
               + ("(met)" if not worse else "(NOT met: " + ", ".join(
                   f"{r['calib']} {r['fraction']:.0%} {r['method']} {r['train']} -> {d} "
                   f"{q(r, d)['before']['ppl_delta']:+.2%} -> "
                   f"{q(r, d)['after']['ppl_delta']:+.2%}" for r, d in worse) + ")"))
    slowest = max(runs, key=lambda r: r["wall_s"])
    out.append(f"slowest distill run {slowest['wall_s'] / 60:.1f} min wall ({slowest['report']['cpu_seconds'] / 60:.1f} "
               f"CPU-min; {slowest['calib']} {slowest['fraction']:.0%} {slowest['train']}) (goal <= 10 min): "
               f"{'met' if slowest['wall_s'] <= 600 else 'NOT met'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--modes", nargs="+", default=["moe", "norms", "router"])
    ap.add_argument("--methods", nargs="+", default=["drop"], choices=["drop", "merge"],
                    help="--prune-method values (merge runs only the first --modes entry)")
    ap.add_argument("--calib", nargs="+", default=list(CALIB_SETS), choices=list(CALIB_SETS))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=64, help="test windows per domain")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `dsexport distill` flags")
    ap.add_argument("--out", type=Path, default=None, help="text report (written as runs finish)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    test_dir = args.model if (args.model / "test.english.txt").is_file() else EMBEDDED_MODEL
    tests = {d: test_dir / f"test.{d}.txt" for d in DOMAINS}
    runs, rows, log = [], [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpora = train_corpora(work)
        head = [f"model: {args.model}", f"test text: {test_dir}/test.{{english,code}}.txt, {args.eval_samples} windows "
                f"of {args.seq_len} tokens each", f"calibration: {args.samples} windows of {args.seq_len} tokens from "
                f"{', '.join(str(corpora[d]) for d in DOMAINS)}; output-mass, global scope",
                f"threads per run: {args.threads}; extra flags: {' '.join(args.extra) or '-'}"]
        for calib in args.calib:
            t0 = time.perf_counter()
            dsexport("calibrate", "--model", args.model, *[x for d in CALIB_SETS[calib] for x in ("--data", corpora[d])],
                     "--out", work / f"prof-{calib}", "--samples", args.samples, "--seq-len", args.seq_len,
                     threads=args.threads)
            log.append(f"calibration {calib}: {time.perf_counter() - t0:.0f} s")
        for fraction in args.fractions:  # the order of the goals: 50% first
            for calib in args.calib:
                for method, mode in [(m, mode) for m in args.methods for mode in args.modes
                                     if m == "drop" or mode == args.modes[0]]:
                    out = work / f"out-{calib}-{fraction}-{method}-{mode}"
                    t0 = time.perf_counter()
                    proc = dsexport("distill", "--model", args.model,
                                    *[x for d in CALIB_SETS[calib] for x in ("--calib", corpora[d])],
                                    "--plan", work / f"prof-{calib}", "--prune", fraction, "--prune-method", method,
                                    "--train", mode,
                                    "--out", out, "--samples", args.samples, "--seq-len", args.seq_len,
                                    *[x for d in DOMAINS for x in ("--eval", tests[d])], "--eval-samples",
                                    args.eval_samples, "--threads", args.threads, "--json", *args.extra,
                                    threads=args.threads)
                    run = {"calib": calib, "fraction": fraction, "method": method, "train": mode,
                           "wall_s": time.perf_counter() - t0,
                           "report": json.loads(proc.stdout)}
                    runs.append(run)
                    rows += rows_of(run, run["report"], tests)
                    print(table(rows[-2:]), flush=True)
                    if args.out:
                        args.out.write_text("\n".join(head + ["", table(rows), ""] + log) + "\n")
                    if args.json:
                        args.json.write_text(json.dumps({"runs": runs}, indent=1))
    summary = goals(runs, tests)
    print("\n".join(summary))
    if args.out:
        args.out.write_text("\n".join(head + ["", table(rows), ""] + log + ["", "goals (issue 16):"] + summary) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "goals": summary}, indent=1))


if __name__ == "__main__":
    main()
