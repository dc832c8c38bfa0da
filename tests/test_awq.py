"""Activation-aware scaling (`--quant-method awq`).

The rewrite must be exact in fp32 (it only moves scale between weights), the searched scales must
round an outlier-heavy layer better than plain rounding, a built awq bundle must be the reference
with the same scales and rounding, and a bundle's scales file is checked like every other input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dsexport.build import BuildConfig, build_bundle
from dsexport.calibration.awq import search_layer
from dsexport.calibration.run import calibrate
from dsexport.core.quant import AWQ_FILE, QuantSpec
from dsexport.exporter.awq import load_scales, with_awq
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference, MoE
from dsexport.runtime import Engine

TEXT = ("Rounding hurts most where the activations are large. The scales move that error to channels "
        "that matter less, and the model computes the same function. ") * 40


@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_greedy"])
def test_the_rewrite_is_exact_in_fp32(artifacts, variant):
    reader = CheckpointReader(artifacts.checkpoint(variant))
    cfg = reader.config
    g = torch.Generator().manual_seed(0)
    scales = {i: (torch.rand(cfg.hidden_size, generator=g) * 4 + 0.25,
                  torch.rand(cfg.num_experts(i), cfg.moe_intermediate_size, generator=g) * 4 + 0.25)
              for i in cfg.moe_layers}
    tokens = torch.randint(3, cfg.vocab_size, (1, 16), generator=g)
    with torch.no_grad():
        want = DeepseekReference.from_checkpoint(reader)(tokens)
        got = DeepseekReference.from_checkpoint(with_awq(reader, scales))(tokens)
        changed = with_awq(reader, scales).experts(min(cfg.moe_layers))[0]
    assert (changed - reader.experts(min(cfg.moe_layers))[0]).abs().max() > 0.1  # the weights did change
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # fp32 reassociation only


def test_the_search_rounds_an_outlier_layer_better_than_rounding(artifacts):
    """Inputs with a few channels 30x larger than the rest (as LLM activations have): the searched
    scales must cut the quantized layer's output error well below round-to-nearest's."""
    reader = CheckpointReader(artifacts.checkpoint("v3_noaux_tc"))
    cfg = reader.config
    layer = min(cfg.moe_layers)
    from dsexport.calibration.run import load_layer

    moe = load_layer(reader, layer).mlp
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, cfg.hidden_size, generator=g)
    x[:, torch.randperm(cfg.hidden_size, generator=g)[:4]] *= 30
    quant = QuantSpec.preset("int4", 32).for_model(cfg.hidden_size, cfg.moe_intermediate_size)
    with torch.no_grad():
        s_in, s_down, record = search_layer(moe, x, quant, layer)
    assert record["input_power"] > 0 and record["error_awq"] < 0.8 * record["error_rtn"], record
    assert torch.isfinite(s_in).all() and (s_in > 0).all() and (s_down > 0).all()


@pytest.fixture(scope="module")
def awq_bundle(artifacts, tmp_path_factory):
    work = tmp_path_factory.mktemp("awq")
    (work / "calib.txt").write_text(TEXT)
    ckpt = artifacts.checkpoint("v3_noaux_tc")
    profile = calibrate(ckpt, [work / "calib.txt"], samples=8, seq_len=32, min_tokens=2)
    out = work / "bundle"
    build_bundle(BuildConfig(ckpt, out, precision="int4", activations="fp32", quant_method="awq"), profile=profile)
    return ckpt, out


def test_an_awq_bundle_is_the_reference_with_its_scales(awq_bundle):
    ckpt, out = awq_bundle
    engine = Engine.load(out, threads=2)
    quant = engine.manifest.quantization
    assert quant.method == "awq" and AWQ_FILE in engine.manifest.files
    assert json.loads((out / "manifest.json").read_text())["quantization"]["method"] == "awq"
    reader = CheckpointReader(ckpt)
    scales = load_scales(out / AWQ_FILE, engine.manifest.model)
    reference = DeepseekReference.from_checkpoint(with_awq(reader, scales), quant)
    plain = DeepseekReference.from_checkpoint(reader, quant)  # round-to-nearest of the same checkpoint
    prompt = np.random.default_rng(5).integers(3, reader.config.vocab_size, size=12).tolist()
    ids = np.asarray([prompt], np.int64)
    got = engine.forward(ids, np.arange(len(prompt))[None], np.ones_like(ids), engine.empty_cache(1))[0][0]
    with torch.no_grad():
        want, rtn = reference(torch.tensor([prompt]))[0].numpy(), plain(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)  # fp32 activations: exact kernels
    assert np.abs(got - rtn).max() > 1e-3  # the bundle holds other weights than round-to-nearest


def test_validate_applies_the_bundles_scales(awq_bundle, run_cli):
    ckpt, out = awq_bundle
    code, stdout, err = run_cli("validate", out, "--reference", ckpt, "--samples", 2, "--seq-len", 24, "--json")
    assert code == 0, err
    checks = {c["name"]: c["passed"] for c in json.loads(stdout)["checks"]}
    assert checks["max_abs_logit_diff"] and "quality_loss_rel" in checks


@pytest.mark.parametrize("damage, words", [
    (lambda t: t.update({k: -v for k, v in t.items()}), "positive finite"),
    (lambda t: t.pop(next(iter(t))), "no scales"),
    (lambda t: t.update({k: v[:3] for k, v in t.items()}), "shapes"),
])
def test_a_damaged_scales_file_is_one_line(awq_bundle, run_cli, tmp_path, damage, words):
    import shutil

    from safetensors.torch import load_file

    from dsexport.core.files import sha256_file

    ckpt, out = awq_bundle
    bundle = Path(shutil.copytree(out, tmp_path / "b"))
    tensors = load_file(str(bundle / AWQ_FILE))
    damage(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bundle / AWQ_FILE))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][AWQ_FILE] = {"bytes": (bundle / AWQ_FILE).stat().st_size, "sha256": sha256_file(bundle / AWQ_FILE)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("validate", bundle, "--reference", ckpt, "--samples", 1, "--seq-len", 8)
    assert code == 2 and "Traceback" not in err and words in err.strip().splitlines()[-1], err
