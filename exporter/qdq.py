"""Quantized weights for TensorRT: DequantizeLinear on constant int8 / int4 weights, then the
standard ops the fp32 graph uses (docs/quantization.md, docs/tensorrt.md).

What onnx-tensorrt's Q/DQ importer takes (QuantDequantLinearHelper, 10.x): scales all positive,
zero points absent or zero (so the `symmetric` scheme of exporter/quantize.py), INT8 / INT4 data;
a scale of the input's rank is block quantization along the one axis where it is smaller. INT4
is weight-only and block-wise (TensorRT 10+), INT8 weights are per output channel. INT4 tensors
and DequantizeLinear's block_size need opset 21 (graph.QDQ_INT4_OPSET; NVIDIA's ModelOpt exports
INT4 for TensorRT at opset 21 too).

Layouts, chosen so the dequantized tensor is what the fp32 graph multiplies by:
- projections: [K, N] (in x out), blocks along K (axis 0) or one scale per column N (axis 1),
  then MatMul(x, DQ(W)): the weight-only pattern TensorRT fuses into the GEMM.
- stacked experts: [E*N, K] (each expert's rows), blocks along K (axis 1) or one scale per row
  (axis 0), then Reshape [E, N, K] and Transpose to [E, K, N] for the `gather` / `dense`
  lowerings (which Gather routed experts or run all of them).
The quantized values are those of exporter/quantize.quantize_rows, so the reference running
`fake_quantize`d weights computes the same numbers. A weight whose input dimension the block
does not divide is int8 per channel (Q/DQ weights cannot be padded; QuantConfig.layout_for).
"""

from __future__ import annotations

import numpy as np

from .graph import GraphBuilder
from .quantize import quantize_rows


def _signed(w_out_in: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[.., N, K] -> (signed values int8 [.., N, K], positive scales [.., N, K/block])."""
    assert w_out_in.shape[-1] % block == 0, "QuantConfig.layout_for: Q/DQ blocks divide K"
    q, d, _ = quantize_rows(w_out_in, bits, block, "symmetric")
    return (q.astype(np.int16) - (1 << (bits - 1))).astype(np.int8), d


def _dequantize(g: GraphBuilder, values: np.ndarray, scales: np.ndarray, bits: int, axis: int,
                block: int | None, name: str) -> str:
    attrs = {"axis": axis}
    if block is not None:
        attrs["block_size"] = block
    return g.op("DequantizeLinear", [g.weight(name + ".q", values, int4=bits == 4),
                                     g.weight(name + ".scale", scales.astype(np.float32))], name=name + "_dq", **attrs)


def linear_qdq(g: GraphBuilder, x: str, w_out_in: np.ndarray, name: str, bits: int, block: int,
               bias: np.ndarray | None = None, row_scale: np.ndarray | float = 1.0) -> str:
    """x @ DQ(W)^T (+ b); row_scale multiplies output rows (folded into the scales)."""
    N, K = w_out_in.shape
    values, d = _signed(w_out_in, bits, block)  # [N, K], [N, K/block]
    d = d * np.asarray(row_scale, np.float32).reshape(-1, 1)
    if block == K:  # one scale per output column of the [K, N] weight
        w = _dequantize(g, np.ascontiguousarray(values.T), d[:, 0], bits, 1, None, name)
    else:
        w = _dequantize(g, np.ascontiguousarray(values.T), np.ascontiguousarray(d.T), bits, 0, block, name)
    y = g.op("MatMul", [x, w], name=name)  # [.., N]
    if bias is not None:
        y = g.op("Add", [y, g.weight(name + ".bias", bias.astype(np.float32))], name=name + "_bias")
    return y


def stacked_qdq(g: GraphBuilder, w_e_out_in: np.ndarray, name: str, bits: int, block: int) -> str:
    """Stacked expert weights [E, N, K] (out x in) -> the dequantized MatMul operand [E, K, N]."""
    E, N, K = w_e_out_in.shape
    values, d = _signed(w_e_out_in.reshape(E * N, K), bits, block)  # [E*N, K], [E*N, K/block]
    if block == K:
        w = _dequantize(g, values, d[:, 0], bits, 0, None, name)
    else:
        w = _dequantize(g, values, d, bits, 1, block, name)
    w = g.op("Reshape", [w, g.const([E, N, K])], name=name + "_3d")
    return g.op("Transpose", [w], name=name + "_t", perm=[0, 2, 1])  # [E, K, N]
