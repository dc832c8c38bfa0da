"""The typed contract: manifests round-trip and migrate, the plan `dsexport plan` prints is the one
`build` executes, and each question has one answer (bytes saved by pruning, the memory plan's
weights, whether a bundle's kernels round activations)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dsexport.build import BuildConfig, build_bundle, resolve_plan
from dsexport.calibration.run import calibrate
from dsexport.core.config import load_config
from dsexport.core.manifest import Manifest
from dsexport.core.quant import QuantSpec, expert_bytes, weight_bytes
from dsexport.runtime import Engine
from dsexport.runtime.validate import ACTIVATION_QUANT_LOGIT_TOL, Thresholds

DATA = Path(__file__).parent / "data" / "manifests"


@pytest.mark.parametrize("path", sorted(DATA.glob("v0.1.0-*.json")), ids=lambda p: p.stem)
def test_manifests_of_the_previous_release_round_trip(path):
    """Manifests written by dsexport 0.1.0 (x86 fp32 and int4, paged, Jetson, MTP, phone) read into
    the typed dataclasses and write back identical."""
    data = json.loads(path.read_text())
    assert Manifest.from_json(data, str(path)).to_json() == data


def test_every_bundle_kind_built_now_round_trips(artifacts, tmp_path):
    for bundle in (artifacts.export("v3_noaux_tc"), artifacts.export_target("v2_greedy")):
        data = json.loads((bundle / "manifest.json").read_text())
        assert Manifest.from_json(data).to_json() == data


def test_a_schema_1_bundle_still_loads_and_generates_the_same_tokens(artifacts, tmp_path):
    import shutil

    src = artifacts.export("v2_greedy")
    old = Path(shutil.copytree(src, tmp_path / "v1"))
    data = json.loads((src / "manifest.json").read_text())
    v1 = {k: data[k] for k in ("format", "created_utc", "producer", "source", "model", "target", "precision",
                               "tokenizer", "stats", "files")}  # (the first schema-1 bundles had no golden outputs)
    v1["schema_version"] = 1
    v1["export"] = {"moe_lowering": data["export"]["moe_lowering"]}
    v1["graphs"] = {"decoder": {k: v for k, v in data["graphs"]["decoder"].items() if k != "moe_lowering"}}
    v1["model"] = {k: v for k, v in data["model"].items() if k not in ("kept_experts", "num_nextn_predict_layers")}
    (old / "manifest.json").write_text(json.dumps(v1))
    migrated = Engine.load(old).manifest
    assert migrated.context == migrated.model.max_position_embeddings and migrated.schema_version == 2
    assert migrated.graphs.decoder.moe_lowering == data["export"]["moe_lowering"]
    prompt = [5, 17, 3, 99]
    assert Engine.load(old).generate(prompt, max_new_tokens=12, ignore_eos=True).output_ids == \
        Engine.load(src).generate(prompt, max_new_tokens=12, ignore_eos=True).output_ids


@pytest.fixture(scope="module")
def profile_dir(artifacts, tmp_path_factory):
    data = tmp_path_factory.mktemp("calib") / "text.txt"
    data.write_text("Only the chosen experts run on the device; the cache is small. " * 80)
    out = tmp_path_factory.mktemp("prof")
    calibrate(artifacts.checkpoint("v3_noaux_tc"), [data], samples=16, seq_len=32, min_tokens=2).save(out)
    return out


def test_pruning_is_priced_at_the_precision_the_bundle_is_built_at(artifacts, profile_dir, run_cli, tmp_path):
    """`plan` and `build` report the same bytes saved, at each precision: the removed experts at the
    build's quantization (fp32 > int8 > int4), and the plan's weights drop by exactly that much."""
    ckpt = artifacts.checkpoint("v3_noaux_tc")
    cfg = load_config(ckpt)
    saved = {}
    for precision in ("fp32", "int8", "int4"):
        flags = ["--model", ckpt, "--precision", precision, "--prune", 0.25, "--calib", profile_dir]
        code, out, err = run_cli("plan", "--target", "x86-cpu", *flags, "--json")
        assert code == 0, err
        plan = json.loads(out)
        code, out, err = run_cli("plan", "--target", "x86-cpu", "--model", ckpt, "--precision", precision, "--json")
        unpruned = json.loads(out)
        code, _, err = run_cli("build", *flags, "--out", tmp_path / precision)
        assert code == 0, err
        built = json.loads((tmp_path / precision / "manifest.json").read_text())["pruning"]
        assert built["bytes_saved"] == plan["pruning"]["bytes_saved"]
        quant = resolve_plan(BuildConfig(ckpt, precision=precision)).quant
        expected = sum(expert_bytes(cfg, quant, int(layer), e) + 4 * cfg.hidden_size + 4
                       for layer, entry in built["layers"].items() for e in entry["removed"])
        assert built["bytes_saved"] == int(expected)
        resident = sum(expert_bytes(cfg, quant, int(layer), e, resident=True) + 4 * cfg.hidden_size + 4
                       for layer, entry in built["layers"].items() for e in entry["removed"])
        assert unpruned["weights_bytes"] - plan["weights_bytes"] == pytest.approx(resident, rel=0.01)
        saved[precision] = built["bytes_saved"]
    assert saved["fp32"] > saved["int8"] > saved["int4"] > 0


def test_the_memory_plan_counts_the_quantization_actually_chosen(run_cli):
    from dsexport import EMBEDDED_MODEL as ckpt  # rows of 128 and more: larger blocks pad nothing

    def weights(*flags):
        code, out, err = run_cli("plan", "--model", ckpt, "--target", "raspberry-pi-5-8gb", *flags, "--json")
        assert code == 0, err
        return json.loads(out)["weights_bytes"]

    int4 = weights("--precision", "int4")
    assert weights("--precision", "int4", "--block-size", "128") < int4  # fewer scales
    assert weights("--precision", "int4", "--quantize", "routed_experts=8") > int4
    assert weights("--precision", "int4", "--quantize", "lm_head=4") < int4
    assert weights("--precision", "int4", "--zero-points") > int4
    assert weights("--precision", "int8") > int4


def test_build_executes_the_plan_plan_prints(artifacts, tmp_path):
    ckpt = artifacts.checkpoint("v2_greedy")
    request = BuildConfig(ckpt, tmp_path / "b", precision="int4", block_size=64, quantize={"dense_mlp": 8})
    plan = resolve_plan(request)
    manifest = build_bundle(request).manifest
    assert manifest.quantization == plan.quant and manifest.context == plan.context
    assert manifest.model == plan.config and manifest.export.moe_shards == plan.moe_shards
    assert manifest.memory_plan["weights_bytes"] == plan.memory.weights_bytes
    on_disk = weight_bytes(plan.config, plan.quant)[0]
    assert manifest.stats.weight_bytes == pytest.approx(on_disk, rel=0.02)


SPECS = {  # bundle kind -> (QuantSpec, whether its kernels round activations to int8)
    "fp32": (None, False),
    "int4 (default: int8 activations)": (QuantSpec.preset("int4"), True),
    "int4, fp32 activations": (QuantSpec.preset("int4", activations="fp32"), False),
    "int8, fp32 activations (8-bit QMoE always rounds)": (QuantSpec.preset("int8", activations="fp32"), True),
    "int4 experts with some at 8 bits, fp32 activations": (
        dataclasses.replace(QuantSpec.preset("int4", activations="fp32"), expert_bits={1: {0: 8}}), True),
    "int8 experts only, fp32 activations": (QuantSpec({"routed_experts": 8}, activations="fp32"), True),
    "TensorRT Q/DQ int8": (dataclasses.replace(QuantSpec.preset("int8", activations="fp32"), lowering="qdq",
                                               scheme="symmetric", per_channel_bits=(8,)), False),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_one_answer_to_whether_a_bundle_rounds_activations(kind):
    """The golden tolerance, validate's thresholds, the paged store's numpy experts and the
    reference's emulation all take QuantSpec's answer."""
    from types import SimpleNamespace

    from dsexport.exporter.golden import logit_tolerance
    from dsexport.exporter.paged import store_format

    spec, rounds = SPECS[kind]
    assert (spec is not None and spec.rounds_activations) == rounds
    assert (logit_tolerance(spec) == ACTIVATION_QUANT_LOGIT_TOL) == rounds
    manifest = SimpleNamespace(rounds_activations=rounds, precision="fp32")
    assert (Thresholds.for_bundle(manifest).max_logit_diff == ACTIVATION_QUANT_LOGIT_TOL) == rounds
    if spec is not None and spec.lowering == "ort" and not spec.expert_bits:
        routed = spec.bits.get("routed_experts")
        assert (store_format(spec)["activations"] == "int8") == bool(spec.expert_activation_block(routed))
    if spec is not None:
        widths = spec.expert_widths() or {None}
        assert any(spec.expert_activation_block(b) for b in widths) or \
            spec.projection_activation_block("attention") or not rounds


def test_the_lowering_table_the_plan_reads_is_the_exporters():
    from dsexport.exporter.lowering import MOE_LOWERINGS as emitters
    from dsexport.targets.registry import MOE_LOWERINGS as table

    assert table == {name: lowering.prefill_ok for name, lowering in emitters.items()}
