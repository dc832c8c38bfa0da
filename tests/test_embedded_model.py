"""The trained model that ships with dsexport: a real DeepSeek-V3-layout checkpoint that speaks English."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dsexport import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from dsexport.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("embedded") / "demo"
    build_bundle(BuildConfig(EMBEDDED_MODEL, out))
    return out


def test_it_is_laid_out_as_a_deepseek_v3_release():
    from dsexport.exporter.checkpoint import CheckpointReader

    raw = json.loads((EMBEDDED_MODEL / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and raw["topk_method"] == "noaux_tc"
    assert raw["q_lora_rank"] and raw["rope_scaling"]["type"] == "yarn" and raw["first_k_dense_replace"] == 1
    assert raw["n_routed_experts"] >= 16 and raw["num_experts_per_tok"] >= 2 and raw["n_shared_experts"] >= 1
    reader = CheckpointReader(EMBEDDED_MODEL)
    L = raw["num_hidden_layers"]
    for key in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "mlp.experts.15.up_proj.weight"):
        assert f"model.layers.{L}.{key}" in reader
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in reader
    assert sum(p.stat().st_size for p in EMBEDDED_MODEL.iterdir()) <= 26 * 2**20
    assert (EMBEDDED_MODEL / "test.english.txt").is_file() and (EMBEDDED_MODEL / "test.code.txt").is_file()


def test_transformers_reads_it_as_our_reference_does():
    from transformers import AutoModelForCausalLM

    from dsexport.exporter.checkpoint import CheckpointReader
    from dsexport.exporter.reference import DeepseekReference

    ids = torch.randint(3, 4000, (1, 48), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    ours = DeepseekReference.from_checkpoint(CheckpointReader(EMBEDDED_MODEL))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_build_without_model_uses_it_and_run_prints_english(tmp_path, run_cli):
    out = tmp_path / "demo"
    code, _, err = run_cli("build", "--out", out)
    assert code == 0 and "embedded model" in err
    code, text, _ = run_cli("run", out, "--prompt", "And God said unto Moses,", "--max-new-tokens", 48)
    assert code == 0
    words = re.findall(r"[A-Za-z]+", text)
    vocabulary = set(re.findall(r"[a-z]+", (EMBEDDED_MODEL / "test.english.txt").read_text().lower()))
    known = sum(w.lower() in vocabulary for w in words)
    assert len(words) >= 20 and known / len(words) >= 0.8, text


def test_it_predicts_held_out_english_far_better_than_unigram(bundle):
    from dsexport.runtime import Engine
    from dsexport.runtime.validate import teacher_forced_logits

    engine = Engine.load(bundle)
    ids = engine.encode((EMBEDDED_MODEL / "test.english.txt").read_text()[:20000])
    window = ids[:512]
    logits = teacher_forced_logits(engine, window)[:-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ppl = float(np.exp(-np.take_along_axis(logp, np.asarray(window[1:])[:, None], 1).mean()))
    counts = np.bincount(ids, minlength=engine.config.vocab_size) + 1.0  # in-sample: a generous baseline
    unigram = float(np.exp(-np.log(counts / counts.sum())[window[1:]].mean()))
    assert ppl < unigram / 3, (ppl, unigram)


def test_validate_passes_on_it(bundle, run_cli):
    assert run_cli("validate", bundle)[0] == 0
    assert run_cli("validate", bundle, "--reference", EMBEDDED_MODEL, "--data", EMBEDDED_MODEL / "test.english.txt")[0] == 0
