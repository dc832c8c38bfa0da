"""The runtime's generation API: sampling semantics, stops, streaming, batches, limits."""

from __future__ import annotations

import numpy as np
import pytest

from dsexport.core.errors import BundleError, ContextLengthError, UserError
from dsexport.runtime import Engine, SamplingParams
from dsexport.runtime.sampling import apply_repetition_penalty, sample_token


@pytest.fixture(scope="module")
def engine(artifacts) -> Engine:
    return Engine.load(artifacts.export("v3_noaux_tc"), threads=2)


# ---- sampling -------------------------------------------------------------------------------
def test_top_k_never_leaves_the_k_best():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    best = set(np.argsort(-logits)[:3].tolist())
    rng = np.random.default_rng(1)
    picks = {sample_token(logits, SamplingParams(temperature=1.5, top_k=3), rng) for _ in range(300)}
    assert picks <= best and len(picks) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    rng = np.random.default_rng(2)
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.75), rng) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.75 <= 0.8


def test_sampling_frequencies_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    rng = np.random.default_rng(3)
    draws = [sample_token(np.log(probs).astype(np.float32), SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.abs(freq - probs).max() < 0.03  # 4000 draws: 3 standard errors of a 0.6 share is 0.023


def test_repetition_penalty_follows_ctrl_semantics():
    logits = np.array([2.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_invalid_sampling_parameters_are_user_errors(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


# ---- generation -----------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, ignore_eos=True)
    a = engine.generate("The quick brown fox", seed=7, **kw).output_ids
    b = engine.generate("The quick brown fox", seed=7, **kw).output_ids
    c = engine.generate("The quick brown fox", seed=8, **kw).output_ids
    assert a == b and a != c


def test_stream_yields_the_same_tokens_and_text_as_generate(engine):
    events = list(engine.stream("Experts are routed", max_new_tokens=20, ignore_eos=True))
    result = engine.generate("Experts are routed", max_new_tokens=20, ignore_eos=True)
    assert [e.token_id for e in events] == result.output_ids
    assert "".join(e.text for e in events) == result.text
    assert [e.finish_reason for e in events[:-1]] == [None] * 19 and events[-1].finish_reason == "length"


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate("A journey of a", max_new_tokens=30, ignore_eos=True).output_ids
    penalized = engine.generate("A journey of a", max_new_tokens=30, ignore_eos=True, repetition_penalty=1.8).output_ids
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))


def test_stop_string_ends_generation_and_is_cut_from_the_text(engine):
    full = engine.generate("The quick brown fox", max_new_tokens=40, ignore_eos=True)
    stop = full.text[10:13]
    assert stop and stop in full.text
    result = engine.generate("The quick brown fox", max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]
    streamed = "".join(e.text for e in engine.stream("The quick brown fox", max_new_tokens=40, ignore_eos=True, stop=stop))
    assert streamed == result.text


def test_eos_ends_generation(engine):
    """Force the eos id into the stream by making it the only allowed stop; then check the reason."""
    free = engine.generate("The quick brown fox", max_new_tokens=30, ignore_eos=True).output_ids
    saved, engine.eos_ids = engine.eos_ids, {free[5]}
    try:
        result = engine.generate("The quick brown fox", max_new_tokens=30)
    finally:
        engine.eos_ids = saved  # the engine is shared by the module's tests
    assert result.finish_reason == "eos" and result.output_ids == free[: free.index(free[5]) + 1]


def test_batch_of_different_lengths_equals_each_prompt_alone(engine):
    prompts = ["Edge devices have little memory and", "A", "Latent attention keeps the cache small. Experts"]
    batch = engine.generate_batch(prompts, max_new_tokens=32, ignore_eos=True)
    for prompt, result in zip(prompts, batch):
        assert result.output_ids == engine.generate(prompt, max_new_tokens=32, ignore_eos=True).output_ids


def test_batched_sampling_gives_each_row_its_own_reproducible_stream(engine):
    """Row r of a seeded batch samples from the stream of (seed, r): row 0 is the prompt sampled
    alone with the seed, a row is the same whatever the other rows are, and two rows of the
    same prompt are two different samples (one stream for all rows made them identical)."""
    prompts = ["The quick brown fox", "Only the chosen ones run"]
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    batch = engine.generate_batch(prompts, **kw)
    assert batch[0].output_ids == engine.generate(prompts[0], **kw).output_ids
    assert [r.output_ids for r in engine.generate_batch(prompts, **kw)] == [r.output_ids for r in batch]
    assert engine.generate_batch([prompts[1], prompts[1]], **kw)[1].output_ids == batch[1].output_ids
    twins = engine.generate_batch([prompts[0], prompts[0]], **kw)
    assert twins[0].output_ids == batch[0].output_ids and twins[1].output_ids != twins[0].output_ids


def test_prompt_longer_than_the_context_is_a_clear_error(artifacts):
    small = Engine.load(artifacts.export("v3_noaux_tc"), max_context=16)
    with pytest.raises(ContextLengthError, match="the prompt has 20 tokens; the context holds 16"):
        small.generate(list(range(3, 23)), max_new_tokens=4)
    result = small.generate(list(range(3, 13)), max_new_tokens=50, ignore_eos=True)
    assert result.finish_reason == "context" and len(result.prompt_ids) + len(result.output_ids) == 16


def test_threads_are_settable(artifacts, monkeypatch):
    monkeypatch.setenv("DSEXPORT_DECODER", "onnxruntime")
    engine = Engine.load(artifacts.export("v3_noaux_tc"), threads=1)
    assert engine.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("DSEXPORT_DECODER", "native")
    engine = Engine.load(artifacts.export("v3_noaux_tc"), threads=1)
    if engine.backend.name == "native":  # the kernel library is built
        assert engine.backend.kernel.threads == 1


def test_token_ids_outside_the_vocabulary_are_rejected(engine):
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([1, 10_000_000])


def test_loading_a_directory_without_manifest_fails_clearly(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Engine.load(tmp_path)


def test_execution_providers_follow_the_target_where_this_onnxruntime_has_them(tmp_path):
    from types import SimpleNamespace

    from dsexport.runtime.sessions import choose_providers

    trt = SimpleNamespace(target=SimpleNamespace(execution_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")),
                          precision="fp16")
    assert choose_providers(trt, ["CPUExecutionProvider"], tmp_path) == ["CPUExecutionProvider"]  # this machine
    gpu = choose_providers(trt, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], tmp_path)
    assert [p if isinstance(p, str) else p[0] for p in gpu] == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu[0][1]["trt_fp16_enable"] == "True" and gpu[0][1]["trt_engine_cache_path"].startswith(str(tmp_path))
