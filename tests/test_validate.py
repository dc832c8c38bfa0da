"""`dsexport validate`: passes the model, fails anything that no longer is the model.

The failing bundles are built from corrupted checkpoints and validated against the original:
a correct export of the wrong weights must fail on the numbers (exit 1), not on integrity.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsexport.build import BuildConfig, build_bundle

VARIANT = "v3_noaux_tc"


@pytest.fixture(scope="module")
def good(artifacts):
    return artifacts.export(VARIANT)


def test_a_correct_bundle_passes_against_the_reference(good, artifacts, run_cli, tmp_path):
    junit = tmp_path / "report.xml"
    code, out, err = run_cli("validate", good, "--reference", artifacts.checkpoint(VARIANT), "--json", "--junit", junit)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["mode"] == "reference" and report["precision"] == "fp32"
    m = report["metrics"]
    assert m["max_abs_logit_diff"] < 1e-4 and m["top1_agreement"] == 1.0
    assert m["teacher_forced_match_length"]["windows_fully_matched"] == m["teacher_forced_match_length"]["windows"]
    assert m["greedy_match_length"]["min"] == m["greedy_match_length"]["of"]
    assert abs(m["perplexity_delta_rel"]) < 1e-5 and m["decode_tokens_per_s"] > 0
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_a_correct_bundle_passes_its_golden_outputs_without_torch_or_checkpoint(good, run_cli):
    code, out, _ = run_cli("validate", good, "--json")
    report = json.loads(out)
    assert code == 0 and report["mode"] == "golden" and report["passed"]
    assert report["metrics"]["max_abs_logit_diff"] < 1e-4 and report["data"]["sequences"] == 4


def _corrupt(src, dst, change) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def _perturb_weights(t):
    w = t["model.layers.1.self_attn.o_proj.weight"]
    t["model.layers.1.self_attn.o_proj.weight"] = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))


def _swap_experts(t):
    """Experts 0 and 1 of layer 1 trade weights; their router rows stay where they were."""
    p = "model.layers.1.mlp.experts."
    for proj in ("gate_proj", "up_proj", "down_proj"):
        a, b = f"{p}0.{proj}.weight", f"{p}1.{proj}.weight"
        t[a], t[b] = t[b].clone(), t[a].clone()


def _change_router_row(t):
    name = "model.layers.2.mlp.gate.weight"
    row = torch.randn(t[name].shape[1], generator=torch.Generator().manual_seed(1))
    t[name] = t[name].clone()
    t[name][5] = row


@pytest.mark.parametrize("change", [_perturb_weights, _swap_experts, _change_router_row])
def test_bundles_built_from_corrupted_checkpoints_fail(artifacts, run_cli, tmp_path, change):
    original = artifacts.checkpoint(VARIANT)
    _corrupt(original, tmp_path / "bad", change)
    build_bundle(BuildConfig(tmp_path / "bad", tmp_path / "bundle"))
    junit = tmp_path / "report.xml"
    code, out, err = run_cli("validate", tmp_path / "bundle", "--reference", original, "--json", "--junit", junit)
    assert code == 1, err
    assert "error:" not in err  # a failed validation, not an input error
    report = json.loads(out)
    assert not report["passed"]
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "max_abs_logit_diff" in failed
    assert ET.parse(junit).getroot().find("testsuite").get("failures") != "0"


def test_an_engine_that_computes_differently_fails_its_golden_outputs(good, run_cli, tmp_path):
    """A device whose engine drifts (here: weights altered, checksums re-signed) fails validation."""
    from dsexport.runtime.bundle import sha256_file

    bundle = tmp_path / "drifted"
    shutil.copytree(good, bundle)
    data = bytearray((bundle / "model.onnx.data").read_bytes())
    data[:4096] = bytes(4096)  # the embedding table's first rows
    (bundle / "model.onnx.data").write_bytes(bytes(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.onnx.data"]["sha256"] = sha256_file(bundle / "model.onnx.data")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli("validate", bundle, "--json")
    assert code == 1 and not json.loads(out)["passed"]


def test_a_modified_bundle_is_bad_input_not_a_verdict(good, run_cli, tmp_path):
    bundle = tmp_path / "modified"
    shutil.copytree(good, bundle)
    with open(bundle / "golden.json", "a") as f:
        f.write(" ")
    code, _, err = run_cli("validate", bundle)
    assert code == 2 and "was modified" in err


def test_a_reference_of_another_model_is_bad_input(good, artifacts, run_cli):
    code, _, err = run_cli("validate", good, "--reference", artifacts.checkpoint("v2_greedy"))
    assert code == 2 and "different model" in err


def test_an_engine_this_machine_cannot_run_exits_3(artifacts, run_cli):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the refusal is for machines without it")
    except ImportError:
        pass
    jetson = artifacts.export_target(VARIANT, target="jetson-orin-nano-8gb")
    code, _, err = run_cli("validate", jetson, "--backend", "tensorrt")
    assert code == 3 and "TensorRT" in err and "Traceback" not in err
    code, out, _ = run_cli("validate", jetson, "--json")  # its ONNX graph validates anywhere
    assert code == 0 and json.loads(out)["passed"]


def test_thresholds_can_be_set_by_flags(good, artifacts, run_cli):
    code, out, _ = run_cli("validate", good, "--reference", artifacts.checkpoint(VARIANT), "--max-logit-diff", 1e-9,
                           "--json")
    assert code == 1
    assert [c["limit"] for c in json.loads(out)["checks"] if c["name"] == "max_abs_logit_diff"] == [1e-9]


def test_data_file_in_jsonl(good, artifacts, run_cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["Only the chosen experts run.", "The cache is small."]))
    code, out, _ = run_cli("validate", good, "--reference", artifacts.checkpoint(VARIANT), "--data", data, "--json")
    assert code == 0 and json.loads(out)["data"]["source"] == str(data)


def test_a_quantized_bundle_is_held_to_the_statistics_its_kernels_allow(run_cli, tmp_path):
    """The embedded model at int4. With int8 activations (the default) a value that lands on a
    rounding boundary differs between ONNX Runtime and the reference's emulation and, end to end,
    moves every later logit (max |diff| ~1 on this CPU): the reference then runs on the bundle's
    own latent cache and the checks are the median position, the worst expert and latent
    agreement, with the max reported. With fp32 activations nothing is rounded and every logit
    is held to 1e-3. Both pass against the reference, against their golden outputs, and within
    the int4 quality budget against the original model."""
    from dsexport import EMBEDDED_MODEL

    checks = {}
    for activations in ("int8", "fp32"):
        bundle = tmp_path / activations
        code, _, err = run_cli("build", "--out", bundle, "--precision", "int4", "--activations", activations)
        assert code == 0, err
        for args in (("--reference", EMBEDDED_MODEL), ()):
            code, out, err = run_cli("validate", bundle, *args, "--json")
            assert code == 0, (activations, args, out, err)
            report = json.loads(out)
            checks[activations, bool(args)] = {c["name"]: c["limit"] for c in report["checks"]}
            assert "max_abs_logit_diff" in report["metrics"]
    assert checks["fp32", True]["max_abs_logit_diff"] == 1e-3
    assert "max_abs_logit_diff" not in checks["int8", True]
    assert {"median_abs_logit_diff", "worst_expert_median_logit_diff", "latent_agreement"} <= set(checks["int8", True])
    assert checks["int8", True]["quality_loss_rel"] == checks["fp32", True]["quality_loss_rel"] == 0.03
    assert checks["int8", False]["worst_expert_median_logit_diff"] > checks["fp32", False]["worst_expert_median_logit_diff"]


def test_a_pruned_bundle_over_its_quality_budget_fails_on_the_specialized_model(run_cli, tmp_path):
    """models/deepseek-specialized, whose experts matter: a quarter of its routed experts removed
    by frequency on code text computes the pruned model exactly (every exactness check passes)
    but loses far more than the fp32 budget (0.5%) on English text against the original model,
    so validate fails on the quality verdict alone; a budget set above the loss passes it."""
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "models" / "deepseek-specialized"
    bundle = tmp_path / "pruned"
    code, _, err = run_cli("build", "--model", model, "--out", bundle, "--prune", 0.25, "--prune-by", "frequency",
                           "--calib", model / "test.code.txt")
    assert code == 0, err
    args = ("validate", bundle, "--reference", model, "--data", model / "test.english.txt", "--json")
    code, out, err = run_cli(*args)
    report = json.loads(out)
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert code == 1 and failed == {"quality_loss_rel"}, (failed, err)
    loss = report["metrics"]["quality"]["quality_loss_rel"]
    assert loss > 0.05  # the budget is 0.5%
    code, out, err = run_cli(*args, "--max-quality-loss", round(loss + 0.05, 3))
    assert code == 0, out


def test_a_build_ends_when_random_tokens_never_reach_an_expert(artifacts, run_cli, tmp_path):
    """Golden coverage adds random windows until every kept expert is routed to; an expert random
    tokens never reach (here: its noaux_tc correction bias at -1e4, so nothing selects it; in a
    specialized model, an expert only one domain uses) must not keep the build looping. It is
    reported as uncovered. (The loop once bounded only the windows it kept, and hung.)"""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    ckpt = Path(shutil.copytree(artifacts.checkpoint(VARIANT), tmp_path / "ckpt"))
    shard = ckpt / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][5] = -1.0e4
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, _, err = run_cli("build", "--model", ckpt, "--out", tmp_path / "b")
    assert code == 0, err
    coverage = json.loads((tmp_path / "b" / "golden.json").read_text())["coverage"]
    assert coverage["uncovered"] == {"1": [5]} and coverage["covered"] == coverage["experts"] - 1
    code, _, err = run_cli("validate", tmp_path / "b")
    assert code == 0, err
