"""Continuous batching (runtime/batch.py): requests joining and leaving a running batch decode
exactly as they would alone."""

from __future__ import annotations

import numpy as np
import pytest

from dsexport.runtime import Engine
from dsexport.runtime.batch import ContinuousBatch
from dsexport.runtime.decode import GenerationConfig
from dsexport.runtime.sampling import SamplingParams

PROMPTS = [[5, 17, 3, 99, 12], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9, 8]]


def _drive(batch: ContinuousBatch, arrivals: dict[int, list]) -> dict:
    """Run steps; arrivals: step -> [(key, prompt, gen)] added before that step. Returns key -> ids."""
    out, requests, step = {}, {}, 0
    while batch.busy or any(s >= step for s in arrivals):
        for key, prompt, gen in arrivals.get(step, []):
            requests[batch.add(prompt, gen).id] = key
        for event in batch.step():
            out.setdefault(requests[event.request.id], []).append(event.token.token_id)
        step += 1
    return out


@pytest.mark.parametrize("paged", [False, True], ids=["fused", "paged"])
def test_requests_joining_and_leaving_decode_as_they_would_alone(artifacts, tmp_path, paged):
    if paged:
        from dsexport.build import BuildConfig, build_bundle

        path = tmp_path / "paged"
        build_bundle(BuildConfig(artifacts.checkpoint("v3_noaux_tc"), path, paged=True))
        engine = Engine.load(path, expert_cache_mb=0.3)  # a third of the experts: evictions mid-batch
    else:
        engine = Engine.load(artifacts.export("v3_noaux_tc"))
    lengths = [9, 4, 12, 6]
    alone = [engine.generate(p, max_new_tokens=n, ignore_eos=True).output_ids for p, n in zip(PROMPTS, lengths)]
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in lengths]
    batch = ContinuousBatch(engine, max_rows=3)  # the fourth waits for a free row
    arrivals = {0: [(0, PROMPTS[0], gens[0]), (1, PROMPTS[1], gens[1])], 2: [(2, PROMPTS[2], gens[2])],
                3: [(3, PROMPTS[3], gens[3])]}
    out = _drive(batch, arrivals)
    assert [out[i] for i in range(4)] == alone


def test_a_cancelled_request_leaves_and_the_others_continue(artifacts):
    engine = Engine.load(artifacts.export("v2_greedy"))
    batch = ContinuousBatch(engine, max_rows=2)
    keep = batch.add(PROMPTS[0], GenerationConfig(max_new_tokens=10, ignore_eos=True))
    drop = batch.add(PROMPTS[2], GenerationConfig(max_new_tokens=10, ignore_eos=True))
    tokens = []
    for step in range(12):
        if step == 3:
            batch.cancel(drop)
        tokens += [e.token.token_id for e in batch.step() if e.request is keep]
        if step == 4:
            assert batch.running == [keep]  # freed within one step
    assert tokens == engine.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).output_ids


def test_seeded_rows_and_logprobs(artifacts):
    engine = Engine.load(artifacts.export("v3_flat_tied"))
    gen = GenerationConfig(max_new_tokens=8, sampling=SamplingParams(temperature=0.9, seed=3), ignore_eos=True)

    def run():
        batch = ContinuousBatch(engine, max_rows=2)
        a, b = batch.add(PROMPTS[0], gen, seed_row=0, top_logprobs=3), batch.add(PROMPTS[0], gen, seed_row=1)
        events = []
        while batch.busy:
            events += batch.step()
        return [[e.token.token_id for e in events if e.request is r] for r in (a, b)], events

    (first, second), events = run()
    assert run()[0] == [first, second] and first != second
    assert first == engine.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=3, ignore_eos=True).output_ids
    scored = [e for e in events if e.top is not None]
    assert scored and all(len(e.top) == 3 and e.top[0][1] >= e.top[-1][1] and np.isfinite(e.logprob) for e in scored)
