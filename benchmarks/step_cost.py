"""What verifying 2 tokens costs against decoding 1: the decoder step at T=1 and T=2, and the MTP draft.

After a prompt of --prompt-tokens, it times engine.forward with 1 new token and with 2 (the
drafting verify step), --repeats times each, interleaved, from the same cache; and the MTP block
on 1 token when the bundle has one (natively where the native decoder runs it, else the MTP graph
in ONNX Runtime: the drafter `Engine.load(draft=...)` uses). Prints the medians, t2/t1, and the
speedup drafting would give at acceptance a: (1 + a) x t1 / (t2 + t_draft) (docs/mtp.md); then
what `--draft auto` measures at load (runtime/draft_policy.py: whole plain and drafting steps,
the decode loop's own costs included) and what it decides. Weights in memory.

    python benchmarks/step_cost.py --bundle /tmp/m/int4 [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from dsexport.runtime import Engine
from dsexport.runtime.engine import load_drafter


def step_costs(engine: Engine, prompt_tokens: int = 64, repeats: int = 30) -> dict:
    """Median seconds of a decoder step with 1 and with 2 new tokens, and of the MTP draft (or None)."""
    vocab = engine.manifest.model.vocab_size
    prompt = np.random.default_rng(0).integers(3, min(vocab, 300), size=prompt_tokens)
    T = len(prompt)
    _, cache = engine.forward(prompt[None], np.arange(T)[None], np.ones((1, T), np.int64), engine.empty_cache(1))
    drafter = load_drafter(engine.backend, engine.bundle) if engine.manifest.graphs.mtp is not None else None
    times = {1: [], 2: [], "draft": []}
    hidden = np.zeros((1, 1, engine.manifest.model.hidden_size), np.float32)
    for _ in range(repeats):
        for n in (1, 2):
            ids = np.full((1, n), 5, np.int64)
            t0 = time.perf_counter()
            engine.forward(ids, np.arange(T, T + n)[None], np.ones((1, T + n), np.int64), cache)
            times[n].append(time.perf_counter() - t0)
        if drafter is not None:
            t0 = time.perf_counter()
            drafter.forward(hidden, np.full((1, 1), 5, np.int64), np.array([[T]]), np.ones((1, 1), np.int64),
                            drafter.empty_cache())
            times["draft"].append(time.perf_counter() - t0)
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    td = statistics.median(times["draft"]) if times["draft"] else None
    return {"t1_s": t1, "t2_s": t2, "ratio": t2 / t1, "draft_s": td,
            "drafter": type(drafter).__name__ if drafter is not None else None}


def predicted_speedup(costs: dict, acceptance: float) -> float | None:
    if costs["draft_s"] is None:
        return None
    return (1 + acceptance) * costs["t1_s"] / (costs["t2_s"] + costs["draft_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    engine = Engine.load(args.bundle, threads=args.threads, weights="memory", verify=False)
    c = step_costs(engine, args.prompt_tokens, args.repeats)
    print(f"{args.bundle} ({engine.backend.name}, {args.threads} threads, context {args.prompt_tokens}): "
          f"1-token step {c['t1_s'] * 1e3:.2f} ms, 2-token step {c['t2_s'] * 1e3:.2f} ms, ratio {c['ratio']:.2f}"
          + (f", MTP draft {c['draft_s'] * 1e3:.2f} ms ({c['drafter']})" if c["draft_s"] is not None
             else ", no MTP graph"))
    if c["draft_s"] is not None:
        print("predicted drafting speedup (1 + a) t1 / (t2 + t_draft): "
              + ", ".join(f"a={a}: {predicted_speedup(c, a):.2f}x" for a in (0.6, 0.7, 0.8, 0.9)))
        from dsexport.runtime.draft_policy import decide

        decision = decide(engine, load_drafter(engine.backend, engine.bundle))
        c["auto"] = decision.to_json()
        print(f"--draft auto at load: plain step {decision.token_ms:.2f} ms, drafting step {decision.verify_ms:.2f} ms "
              f"-> {'drafts' if decision.draft else 'does not draft'} ({decision.reason})")
    print(json.dumps(c))


if __name__ == "__main__":
    main()
