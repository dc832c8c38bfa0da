"""MTP drafting on the embedded model's test split: acceptance, greedy agreement, decode speed.

    python benchmarks/mtp.py [--bundle DIR] [--windows 8] [--prompt-tokens 48] [--new-tokens 64]
                             [--threads 2] [--repeats 3] [--json] [--out FILE]

Builds an fp32 x86-cpu bundle of the embedded model (with its MTP graph) unless --bundle is
given. For prompts cut from src/dsexport/assets/deepseek-tiny/test.{english,code}.txt it decodes
greedily with and without drafting and reports:

- acceptance: accepted / drafted tokens over all prompts (and sampled at temperature 1 as well);
- greedy mismatches: prompts whose drafted output differs from plain decoding, with the top-2
  logit gap of plain decoding at the first differing token (allowed only within the parity
  tolerance: running two tokens at once changes float rounding, which can flip a near-tie);
- decode tokens/s with and without drafting (best of --repeats, alternating the two), and the
  ratio. Runs are timed in this process, one after the other; other load on the machine shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dsexport import EMBEDDED_MODEL
from dsexport.runtime import Engine

DOC_SEPARATOR = "\n\x1e\n"  # training/data.py: between chapters / files of the test split
PARITY_TOLERANCE = 1e-3  # exporter/golden.py BUILD_LOGIT_TOL: a top-2 gap below 2x this is a near-tie


def prompts_from_test_split(engine: Engine, count: int, length: int) -> dict[str, list[list[int]]]:
    out = {}
    for corpus in ("english", "code"):
        text = (EMBEDDED_MODEL / f"test.{corpus}.txt").read_text().replace(DOC_SEPARATOR, "\n")
        ids = engine.encode(text)
        step = max(length, (len(ids) - length) // count)
        out[corpus] = [ids[i:i + length] for i in range(0, len(ids) - length, step)][:count]
    return out


def top2_gap(engine: Engine, ids: list[int]) -> float:
    """The top-2 logit gap of plain decoding for the token after ids (one prefill)."""
    n = len(ids)
    logits, _ = engine.forward(np.asarray([ids]), np.arange(n)[None], np.ones((1, n), np.int64), engine.empty_cache(1))
    top = np.sort(logits[0, -1])[-2:]
    return float(top[1] - top[0])


def timed(engine: Engine, prompts: list[list[int]], new_tokens: int, **kwargs) -> tuple[list, float, int]:
    """Generations, decode seconds and decode tokens over all prompts."""
    results, seconds, tokens = [], 0.0, 0
    for p in prompts:
        r = engine.generate(p, max_new_tokens=new_tokens, ignore_eos=True, **kwargs)
        results.append(r)
        steps = len(r.output_ids) - 1
        seconds += steps / r.decode_tokens_per_s if r.decode_tokens_per_s else 0.0
        tokens += steps
    return results, seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--windows", type=int, default=8, help="prompts per corpus")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args()

    tmp = None
    bundle = args.bundle
    if bundle is None:
        from dsexport.build import BuildConfig, build_bundle

        tmp = tempfile.TemporaryDirectory()
        bundle = Path(tmp.name) / "embedded"
        t = time.perf_counter()
        build_bundle(BuildConfig(EMBEDDED_MODEL, bundle, mtp=True))
        print(f"built {bundle} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    plain = Engine.load(bundle, threads=args.threads)
    drafting = Engine.load(bundle, threads=args.threads, draft="mtp")
    corpora = prompts_from_test_split(plain, args.windows, args.prompt_tokens)

    report = {"bundle": str(bundle), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "corpora": {}}
    for corpus, prompts in corpora.items():
        best_plain = best_draft = None
        for _ in range(args.repeats):  # alternate, keep each mode's fastest pass
            base, s0, n0 = timed(plain, prompts, args.new_tokens)
            spec, s1, n1 = timed(drafting, prompts, args.new_tokens)
            best_plain = min(best_plain or s0, s0)
            best_draft = min(best_draft or s1, s1)
        drafted = sum(r.draft_stats.drafted for r in spec)
        accepted = sum(r.draft_stats.accepted for r in spec)
        mismatches = []
        for p, a, b in zip(prompts, base, spec):
            if a.output_ids != b.output_ids:
                k = next(i for i, (x, y) in enumerate(zip(a.output_ids, b.output_ids)) if x != y)
                gap = top2_gap(plain, p + a.output_ids[:k])
                mismatches.append({"token": k, "top2_gap": gap, "near_tie": gap <= 2 * PARITY_TOLERANCE})
        sampled = [drafting.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True, temperature=1.0, seed=i)
                   for i, p in enumerate(prompts)]
        s_drafted = sum(r.draft_stats.drafted for r in sampled)
        s_accepted = sum(r.draft_stats.accepted for r in sampled)
        report["corpora"][corpus] = {
            "prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_decoder_run": n1 / sum(r.draft_stats.decoder_runs for r in spec),
            "sampled_acceptance_rate": s_accepted / s_drafted if s_drafted else 0.0,
            "greedy_mismatches": len(mismatches),
            "mismatches_beyond_near_tie": sum(not m["near_tie"] for m in mismatches),
            "mismatch_details": mismatches,
            "plain_decode_tokens_per_s": n0 / best_plain, "draft_decode_tokens_per_s": n1 / best_draft,
            "speedup": (n1 / best_draft) / (n0 / best_plain),
        }
    rows = report["corpora"].values()
    total_drafted = sum(r["drafted"] for r in rows)
    report["acceptance_rate"] = sum(r["accepted"] for r in rows) / total_drafted if total_drafted else 0.0
    report["greedy_mismatches"] = sum(r["greedy_mismatches"] for r in rows)
    report["speedup"] = float(np.mean([r["speedup"] for r in rows]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for corpus, r in report["corpora"].items():
            print(f"{corpus}: acceptance {r['acceptance_rate']:.3f} ({r['accepted']}/{r['drafted']}, "
                  f"{r['tokens_per_decoder_run']:.2f} tokens per decoder run), sampled (T=1) "
                  f"{r['sampled_acceptance_rate']:.3f}; greedy mismatches {r['greedy_mismatches']}/{r['prompts']} "
                  f"({r['mismatches_beyond_near_tie']} beyond a near-tie); decode {r['plain_decode_tokens_per_s']:.0f} "
                  f"tok/s plain, {r['draft_decode_tokens_per_s']:.0f} drafting: x{r['speedup']:.2f}")
        print(f"overall: acceptance {report['acceptance_rate']:.3f}, greedy mismatches {report['greedy_mismatches']}, "
              f"speed-up x{report['speedup']:.2f} ({args.threads} threads)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
