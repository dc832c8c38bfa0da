"""int8 / int4 weights on TensorRT targets (exporter/qdq.py): DequantizeLinear on constant weights
in standard-op graphs, checked without TensorRT. ONNX Runtime runs exactly the graph TensorRT
parses, so it is compared with the reference model running the same dequantized weights; the
static check covers the Q/DQ nodes per TensorRT version.

Tolerance: these graphs compute in fp32 with the dequantized weights (weight-only quantization,
no activation quantization), so they must match the reference as closely as the fp32 export
does, 1e-4 on every logit (docs/parity.md), and greedy tokens exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from dsexport.core.errors import UserError
from dsexport.build import BuildConfig, build_bundle
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.quantize import QuantConfig
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime import Engine
from dsexport.targets.tensorrt_check import check_model

from conftest import VARIANTS

JETSON = "jetson-orin-nano-8gb"


def _dq_nodes(graph):
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _dq_nodes(a.g)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tensorrt_quantized_bundle_equals_the_dequantized_reference(artifacts, tmp_path, variant, precision):
    ckpt = artifacts.checkpoint(variant)
    out = tmp_path / "b"
    manifest = build_bundle(BuildConfig(ckpt, out, target=JETSON, precision=precision, max_context=64)).manifest.to_json()
    quant = QuantConfig.from_json(manifest["quantization"])
    assert quant.lowering == "qdq" and quant.scheme == "symmetric" and quant.per_channel_bits == (8,)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain == "")
    dq = list(_dq_nodes(model.graph))
    weights = {i.name: i for i in model.graph.initializer}
    types = {weights[n.input[0]].data_type for n in dq}
    # int8: every quantized part per channel at opset 17; int4 adds INT4 blocks (opset 21), lm_head int8
    assert types == ({TensorProto.INT8} if precision == "int8" else {TensorProto.INT8, TensorProto.INT4})
    assert opset == (17 if precision == "int8" else 21)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)  # INT4 tensors need IR 10
    assert not any(n.op_type in ("MatMulNBits", "QMoE") for n in model.graph.node)
    assert manifest["tensorrt"]["checks"]["10.3"]["decoder"]["ok"]
    assert manifest["tensorrt"]["checks"]["8.5"]["decoder"]["ok"] == (precision == "int8")
    flags = manifest["tensorrt"]["engine_plan"]["builder_flags"]  # the flags that admit quantized layers
    assert "FP16" in flags and "INT8" in flags and ("INT4" in flags) == (precision == "int4")

    engine = Engine.load(out, threads=2)
    reader = CheckpointReader(ckpt)
    reference = DeepseekReference.from_checkpoint(reader, quant)
    prompt = np.random.default_rng(5).integers(3, reader.config.vocab_size, size=10).tolist()
    output = engine.generate(prompt, max_new_tokens=12, ignore_eos=True).output_ids
    tokens = prompt + output
    with torch.no_grad():
        ref = reference(torch.tensor([tokens]))[0].numpy()
    logits, _ = engine.forward(np.array([tokens]), np.arange(len(tokens))[None], np.ones((1, len(tokens)), np.int64),
                               engine.empty_cache(1))  # a prompt: the `dense` branch
    np.testing.assert_allclose(logits[0], ref, atol=1e-4, rtol=0)
    assert ref[len(prompt) - 1:-1].argmax(-1).tolist() == output  # decode steps: the `gather` branch
    fp32 = DeepseekReference.from_checkpoint(reader)
    with torch.no_grad():
        assert np.abs(fp32(torch.tensor([tokens]))[0].numpy() - ref).max() > 1e-3  # the weights are quantized


def test_tensorrt_int4_needs_tensorrt_10_and_the_check_covers_dq(artifacts, tmp_path):
    ckpt = artifacts.checkpoint("v3_noaux_tc")
    with pytest.raises(UserError, match="TensorRT 10"):
        build_bundle(BuildConfig(ckpt, tmp_path / "b", target=JETSON, precision="int4", tensorrt="8.5"))
    with pytest.raises(UserError, match="symmetric"):
        build_bundle(BuildConfig(ckpt, tmp_path / "b", target=JETSON, precision="int4", zero_points=True))
    assert not (tmp_path / "b").exists()
    out = tmp_path / "ok"
    build_bundle(BuildConfig(ckpt, out, target=JETSON, precision="int4", max_context=64))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert check_model(model, "10.3").ok
    errors = check_model(model, "8.5").errors  # no INT4, no blocks, opset 21 > 17
    assert any("opset 21" in e.message for e in errors) and any(e.op == "DequantizeLinear" for e in errors)
    # a blocked scale along two axes is refused by name
    weights = {i.name: i for i in model.graph.initializer}
    blocked = [n for n in _dq_nodes(model.graph) if len(weights[n.input[1]].dims) == len(weights[n.input[0]].dims)]
    assert blocked  # the INT4 weights are block-quantized
    weights[blocked[0].input[1]].dims[:] = [1] * len(weights[blocked[0].input[1]].dims)
    assert any("exactly one axis" in e.message for e in check_model(model, "10.3").errors)
