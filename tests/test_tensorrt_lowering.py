"""TensorRT-bound bundles, checked without TensorRT: the static parser check, the engine plan,
and the TensorRT graphs themselves run in ONNX Runtime against the x86 bundle.

The graphs a Jetson bundle ships are standard ONNX, so ONNX Runtime runs exactly what TensorRT
will parse; TensorRT's own numerics (fp16, kernels) are checked on the device
(benchmarks/compare_trt_ort.py, tests/test_tensorrt.py).
"""

from __future__ import annotations

import fnmatch
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsexport.runtime import Engine
from dsexport.targets.tensorrt_check import check_model, check_profiles

from conftest import VARIANTS

JETSON = "jetson-orin-nano-8gb"


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _x(name="x", dtype=TensorProto.FLOAT, shape=("n", 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def _errors(model, version, route="tensorrt"):
    return check_model(model, version, route).errors


def test_an_op_the_version_cannot_parse_is_rejected_by_name():
    m = _model([helper.make_node("IsInf", ["x"], ["y"], name="the_isinf")], [_x()], [_x("y", TensorProto.BOOL)])
    (err,) = _errors(m, "8.5")
    assert err.node == "the_isinf" and "cannot parse IsInf" in err.message
    assert _errors(m, "10.3") == []  # IsInf arrived in 8.6
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [_x()], [_x("y")])
    assert [e.node for e in _errors(m, "10.3")] == ["u"]


def test_attributes_and_constant_inputs_the_version_requires():
    k_const = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    unsorted = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", sorted=0)], [_x()],
                      [_x("v"), _x("i", TensorProto.INT64)], [k_const])
    assert "sorted must be 1" in _errors(unsorted, "10.3")[0].message
    dynamic_k = _model([helper.make_node("TopK", ["x", "kin"], ["v", "i"], name="top")],
                       [_x(), _x("kin", TensorProto.INT64, [1])], [_x("v"), _x("i", TensorProto.INT64)])
    assert any("K must be an initializer" in e.message for e in _errors(dynamic_k, "8.5"))
    assert _errors(dynamic_k, "10.3") == []
    big_k = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top")], [_x()],
                   [_x("v"), _x("i", TensorProto.INT64)], [helper.make_tensor("k", TensorProto.INT64, [1], [4000])])
    assert "K < 3840" in _errors(big_k, "10.3")[0].message
    scatter = _model([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name="sc", reduction="add")],
                     [_x(), _x("idx", TensorProto.INT64, [1, 1]), _x("upd", TensorProto.FLOAT, [1, 8])], [_x("y")])
    assert "reduction" in _errors(scatter, "10.3")[0].message
    starts, ends = helper.make_tensor("s", TensorProto.INT64, [1], [0]), helper.make_tensor("e", TensorProto.INT64, [1], [4])
    tensor_axes = _model([helper.make_node("Slice", ["x", "s", "e", "ax"], ["y"], name="sl")],
                         [_x(), _x("ax", TensorProto.INT64, [1])], [_x("y")], [starts, ends])
    assert "`axes`" in _errors(tensor_axes, "8.5")[0].message and _errors(tensor_axes, "10.3") == []  # 10.3 added it


def test_types_zero_points_and_opsets():
    ints = _model([helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="rs", keepdims=0)],
                  [_x(dtype=TensorProto.INT32)], [_x("y", TensorProto.INT32, ["n"])],
                  [helper.make_tensor("ax", TensorProto.INT64, [1], [1])])
    assert "is INT32" in _errors(ints, "8.5")[0].message and _errors(ints, "10.3") == []
    dq = _model([helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], name="dq")], [], [_x("y", shape=[4])],
                [helper.make_tensor("w", TensorProto.INT8, [4], [1, 2, 3, 4]), helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
                 helper.make_tensor("z", TensorProto.INT8, [], [3])])
    assert "zero point" in _errors(dq, "10.3")[0].message
    opset18 = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")], opset=18)
    assert "opset 18" in _errors(opset18, "8.5")[0].message and _errors(opset18, "10.3") == []


def test_contrib_ops_fail_in_tensorrt_and_are_named_where_ort_partitions_them(artifacts):
    x86 = artifacts.export("v3_noaux_tc")
    model = onnx.load(str(x86 / "model.onnx"), load_external_data=False)
    moe_nodes = [n.name for n in model.graph.node if n.domain == "com.microsoft"]
    assert moe_nodes
    native = check_model(model, "10.3", "tensorrt")
    assert [e.node for e in native.errors] == moe_nodes and "plugin" in native.errors[0].message
    partitioned = check_model(model, "10.3", "ort-tensorrt-ep")
    assert partitioned.ok and [f.node for f in partitioned.outside] == moe_nodes
    assert all("CUDAExecutionProvider" in f.message for f in partitioned.outside)


def test_jetson_bundle_passes_the_tensorrt_10_3_check_and_carries_an_engine_plan(artifacts, run_cli):
    bundle = artifacts.export_target("v3_noaux_tc", target=JETSON)
    manifest = json.loads((bundle / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    assert decoder["moe_lowering"] == "gather" and decoder["prompt_moe_lowering"] == "dense"
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]  # one per MoE layer, weights shared by both branches
    assert len(ifs) == manifest["model"]["num_hidden_layers"] - manifest["model"]["first_k_dense_replace"]
    assert manifest["tensorrt"]["checked_against"] == "10.3"
    assert all(r["ok"] for r in manifest["tensorrt"]["checks"]["10.3"].values())
    code, out, _ = run_cli("check", bundle, "--tensorrt", "10.3", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and len(report["reports"]) == 1
    assert all(r["outside_tensorrt"] == [] for r in report["reports"])  # every node runs in TensorRT
    code, out, _ = run_cli("check", artifacts.export("v3_noaux_tc"), "--tensorrt", "10.3")
    assert code == 1 and "com.microsoft" in out and "FAILED" in out

    plan = manifest["tensorrt"]["engine_plan"]
    assert plan["precision"] == "fp16" and plan["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert plan["tf32"] is False and not plan["strongly_typed"] and not plan["int64_io_as_int32"]
    (graph,) = plan["graphs"].values()
    assert [p["input_ids"]["max"][1] for p in graph["profiles"]] == [1, plan["prefill_tokens"]]  # decode, prompts
    assert check_profiles(model, graph["profiles"], graph["file"]) == []
    names = [n.name for n in _all_nodes(model.graph)]
    for pattern in plan["fp32_layers"]:  # no stale pattern: each keeps some layer in fp32
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    broken = json.loads(json.dumps(plan["graphs"]["decoder"]["profiles"]))
    del broken[0]["past_latent.0"]
    decoder = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert any("past_latent.0" in p for p in check_profiles(decoder, broken, "model.onnx"))


def test_tensorrt_versions_change_the_plan(artifacts, tmp_path):
    from dsexport.core.errors import UserError
    from dsexport.build import BuildConfig, build_bundle

    ckpt = artifacts.checkpoint("v2_greedy")
    old = build_bundle(BuildConfig(ckpt, tmp_path / "jp5", target=JETSON, tensorrt="8.5")).manifest.to_json()
    assert old["tensorrt"]["engine_plan"]["int64_io_as_int32"] and old["tensorrt"]["checked_against"] == "8.5"
    with pytest.raises(UserError, match="strongly typed"):
        build_bundle(BuildConfig(ckpt, tmp_path / "thor", target="jetson-thor", tensorrt="11"))
    assert not (tmp_path / "thor").exists()
    thor = build_bundle(BuildConfig(ckpt, tmp_path / "thor", target="jetson-thor", tensorrt="11", precision="fp32"))
    plan = thor.manifest.to_json()["tensorrt"]["engine_plan"]
    assert plan["strongly_typed"] and plan["builder_flags"] == [] and plan["tf32"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensorrt_graphs_generate_the_x86_bundles_tokens(artifacts, variant):
    """decode: the If's `gather` branch; prompts: its `dense` branch (and chunked prefill): same
    tokens, logits within 1e-4 of the fused-op bundle (measured ~2e-6; fp32 reorderings of one sum)."""
    jetson = Engine.load(artifacts.export_target(variant, target=JETSON))
    x86 = Engine.load(artifacts.export(variant))
    rng = np.random.default_rng(1)
    vocab = int(x86.config.vocab_size)
    prompts = [[5], rng.integers(0, vocab, 9).tolist(), rng.integers(0, vocab, 40).tolist()]
    for prompt in prompts:
        ids = np.array([prompt])
        args = (np.arange(len(prompt))[None], np.ones_like(ids))
        a, _ = jetson.forward(ids, *args, jetson.empty_cache(1))
        b, _ = x86.forward(ids, *args, x86.empty_cache(1))
        assert np.abs(a - b).max() < 1e-4
        expected = x86.generate(prompt, max_new_tokens=16, ignore_eos=True).output_ids
        assert jetson.generate(prompt, max_new_tokens=16, ignore_eos=True).output_ids == expected
    jetson.prefill_chunk = 3  # prompts as several prefill steps, the last one possibly a decode step
    assert jetson.generate(prompts[2], max_new_tokens=16, ignore_eos=True).output_ids == \
        x86.generate(prompts[2], max_new_tokens=16, ignore_eos=True).output_ids
