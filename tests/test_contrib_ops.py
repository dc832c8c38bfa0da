"""Conformance of the ONNX Runtime contrib ops dsexport emits, against numpy, on the pinned version.

The export relies on exact semantics that a new onnxruntime release could change: the MoE op's
weight layouts, its interleaved SwiGLU with alpha=1/beta=0 being plain SiLU gating, and its
softmax over a router input of log-weights at the chosen experts and -inf elsewhere. If an
upgrade breaks any of that, these tests fail before a bundle silently changes.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

TOL = 1e-5  # float32 accumulation-order differences over hidden 32 / inter 16


def _silu(x):
    return x / (1 + np.exp(-x))


def _moe_graph(E: int, k: int, D: int, I: int) -> bytes:
    node = helper.make_node(
        "MoE", ["x", "router", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=k,
        activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
        normalize_routing_weights=0,
    )
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D]),
         helper.make_tensor_value_info("router", TensorProto.FLOAT, ["N", E]),
         helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [E, 2 * I, D]),
         helper.make_tensor_value_info("fc2", TensorProto.FLOAT, [E, D, I])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def test_onnxruntime_is_the_pinned_version():
    """The conformance below was established on this version; pyproject.toml pins it."""
    assert ort.__version__ == "1.32.0"


@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_moe_op_with_preselected_experts_and_log_weights(tokens):
    rng = np.random.default_rng(tokens)
    E, k, D, I = 8, 3, 32, 16
    x = rng.standard_normal((tokens, D)).astype(np.float32)
    gate = rng.standard_normal((E, I, D)).astype(np.float32) * 0.2
    up = rng.standard_normal((E, I, D)).astype(np.float32) * 0.2
    down = rng.standard_normal((E, D, I)).astype(np.float32) * 0.2
    # Selection done outside the op (any routing rule), weights unnormalized as DeepSeek's can be.
    idx = np.stack([rng.choice(E, size=k, replace=False) for _ in range(tokens)])  # [N, k]
    w = rng.uniform(0.05, 1.0, size=(tokens, k)).astype(np.float32)  # [N, k]
    router = np.full((tokens, E), -np.inf, np.float32)
    np.put_along_axis(router, idx, np.log(w), axis=1)
    fc1 = np.stack([gate, up], axis=2).reshape(E, 2 * I, D)  # interleaved rows g0,u0,g1,u1,...

    session = ort.InferenceSession(_moe_graph(E, k, D, I), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x, "router": router, "fc1": fc1, "fc2": down})[0]

    expected = np.zeros_like(x)
    for n in range(tokens):
        for j in range(k):
            e = idx[n, j]
            h = _silu(gate[e] @ x[n]) * (up[e] @ x[n])
            expected[n] += w[n, j] * (down[e] @ h)
    # The op's softmax returns w / sum(w): the export multiplies the sum back after it.
    got = y * w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_moe_op_ignores_experts_outside_the_selection():
    """Experts at -inf never contribute, even when their weights would dominate."""
    rng = np.random.default_rng(0)
    E, k, D, I = 4, 2, 16, 8
    x = rng.standard_normal((2, D)).astype(np.float32)
    fc1 = rng.standard_normal((E, 2 * I, D)).astype(np.float32) * 0.2
    fc2 = rng.standard_normal((E, D, I)).astype(np.float32) * 0.2
    router = np.full((2, E), -np.inf, np.float32)
    router[:, [0, 1]] = 0.0
    session = ort.InferenceSession(_moe_graph(E, k, D, I), providers=["CPUExecutionProvider"])
    y1 = session.run(None, {"x": x, "router": router, "fc1": fc1, "fc2": fc2})[0]
    fc1b, fc2b = fc1.copy(), fc2.copy()
    fc1b[2:] *= 100.0
    fc2b[2:] *= 100.0
    y2 = session.run(None, {"x": x, "router": router, "fc1": fc1b, "fc2": fc2b})[0]
    np.testing.assert_array_equal(y1, y2)
