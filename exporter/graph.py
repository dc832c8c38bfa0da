"""A small ONNX graph builder that streams initializers to one external-data file.

Weights are written to disk the moment they are added and only their location is kept in the
graph, so a build holds one layer's tensors at a time, whatever the model's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 64  # external-data offsets aligned for mmap-friendly, vectorizable reads
OPSET = 17
# INT4 tensors and block-wise DequantizeLinear arrive in opset 21 (TensorRT int4 weights)
QDQ_INT4_OPSET = 21
MS_DOMAIN = "com.microsoft"

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class GraphBuilder:
    def __init__(self, data_path: Path, opset: int = OPSET):
        self.data_path = Path(data_path)
        self.opset = opset
        self._data = open(self.data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self._weights: dict[str, tuple] = {}
        self.locations: dict[str, tuple[int, int]] = {}  # weight name -> (offset, bytes) in the data file
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.weight_bytes = 0

    # ---- names and values ---------------------------------------------------------------
    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def weight(self, name: str, array: np.ndarray, int4: bool = False) -> str:
        """Append a weight to the external-data file; the graph keeps only its location.

        A name already written is not written again (the branches of an If share their weights).
        int4: `array` holds signed values in -8..7 (int8), stored as ONNX INT4, two per byte,
        the even flat index in the low nibble.
        """
        array = np.ascontiguousarray(array)
        if name in self._weights:
            if self._weights[name] != (array.dtype.str, array.shape):
                raise ValueError(f"weight {name} written twice with different dtype/shape")
            return name
        self._weights[name] = (array.dtype.str, array.shape)
        offset = self._data.tell()
        pad = -offset % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        if int4:
            nibbles = (array.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
        else:
            raw = array.tobytes()
        self._data.write(raw)
        self.locations[name] = (offset, len(raw))
        dtype = TensorProto.INT4 if int4 else _NP_TO_ONNX[array.dtype]
        tensor = TensorProto(name=name, data_type=dtype, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        self.weight_bytes += len(raw)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape, axes, scalars), deduplicated and kept inside the graph."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(helper.make_tensor(name, _NP_TO_ONNX[array.dtype], array.shape, array.flatten().tolist()))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        base = name or op_type.lower()
        outs = [self.fresh(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh("n_" + base), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def reduce(self, op_type: str, x: str, axes: list[int], name: str, keepdims: int = 1) -> str:
        """ReduceMean/ReduceMax: axes an attribute up to opset 17, an input from opset 18."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.const(axes)], name=name, keepdims=keepdims)
        return self.op(op_type, [x], name=name, axes=axes, keepdims=keepdims)

    def branch(self, cond: str, then_emit: Callable[[], str], else_emit: Callable[[], str], name: str,
               elem_type: int, shape: list) -> str:
        """An If node: each emitter's nodes go into its branch subgraph, which reads outer-scope
        values and weights (written once, shared by both branches) and returns one value."""
        branches = []
        for tag, emit in (("then", then_emit), ("else", else_emit)):
            outer, self.nodes = self.nodes, []
            try:
                value = emit()
            finally:
                inner, self.nodes = self.nodes, outer
            out = self.fresh(f"{name}_{tag}")  # TensorRT: the branches' outputs need different names
            inner.append(helper.make_node("Identity", [value], [out], name=self.fresh(f"n_{name}_{tag}_out")))
            branches.append(helper.make_graph(inner, f"{name}_{tag}", [], [helper.make_tensor_value_info(out, elem_type, shape)]))
        return self.op("If", [cond], name=name, then_branch=branches[0], else_branch=branches[1])

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("n_out_" + name)))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # ---- common blocks ------------------------------------------------------------------
    def linear(self, x: str, w_out_in: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        """x @ W^T (+ b) for a torch-layout weight [out, in]; stored transposed for MatMul."""
        y = self.op("MatMul", [x, self.weight(name + ".weight", w_out_in.T.astype(np.float32))], name=name)
        if bias is not None:
            y = self.op("Add", [y, self.weight(name + ".bias", bias.astype(np.float32))], name=name + "_bias")
        return y

    def linear_nbits(self, x: str, w_out_in: np.ndarray, name: str, bits: int, block: int,
                     bias: np.ndarray | None = None, row_scale: np.ndarray | float = 1.0,
                     accuracy_level: int = 0, scheme: str = "absmax") -> str:
        """x @ dequant(Q(W))^T (+ b) with ONNX Runtime's MatMulNBits (block-wise, exact against
        exporter/quantize.dequantize_rows; zero points as its 4th input for the asymmetric
        scheme). row_scale multiplies output rows after quantizing (a folded constant scales
        the block scales, so the quantized values stay those of W)."""
        from .quantize import pack, pack_zero_points, quantize_rows

        N, K = w_out_in.shape
        q, d, zero = quantize_rows(w_out_in, bits, block, scheme)  # [N, Kp], [N, Kp/block], [N, Kp/block]
        if bits == 6:  # 6-bit levels in the 8-bit form (core/quant.storage_bits): the same q - zero
            q, zero, bits = q + np.uint8(96), None if zero is None else zero + np.uint8(96), 8
        d = (d * np.asarray(row_scale, np.float32).reshape(-1, 1)).astype(np.float32)
        packed = pack(q, bits).reshape(N, d.shape[1], -1)  # [N, blocks, bytes per block]
        inputs = [x, self.weight(name + ".qweight", packed), self.weight(name + ".scales", d.reshape(-1))]
        if zero is not None:
            inputs.append(self.weight(name + ".zero_points", pack_zero_points(zero, bits).reshape(-1)))
        y = self.op("MatMulNBits", inputs, name=name, domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=block,
                    accuracy_level=accuracy_level)
        if bias is not None:
            y = self.op("Add", [y, self.weight(name + ".bias", bias.astype(np.float32))], name=name + "_bias")
        return y

    def linear_split(self, x: str, weights: list[np.ndarray], name: str,
                     biases: list[np.ndarray | None] | None = None) -> list[str]:
        """Several projections of the same input as one MatMul, then Split: one weight stream
        and one kernel dispatch instead of several."""
        sizes = [w.shape[0] for w in weights]
        bias = None
        if biases and any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])
        y = self.linear(x, np.concatenate(weights, axis=0), name, bias)
        return self.op("Split", [y, self.const(sizes)], name=name + "_split", outputs=len(sizes), axis=-1)

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        # x / sqrt(mean(x^2) + eps) * w in standard ops, in the exact pattern ONNX Runtime fuses
        # into one SimplifiedLayerNormalization kernel (7 small ops cost more than the math).
        sq = self.op("Pow", [x, self.const(2.0, np.float32)], name=name + "_sq")
        mean = self.reduce("ReduceMean", sq, [-1], name + "_mean")
        var = self.op("Add", [mean, self.const(eps, np.float32)], name=name + "_eps")
        y = self.op("Div", [x, self.op("Sqrt", [var], name=name + "_sqrt")], name=name + "_scaled")
        return self.op("Mul", [y, self.weight(name + ".weight", weight.astype(np.float32))], name=name)

    # ---- finish -------------------------------------------------------------------------
    def close_data(self) -> None:
        if not self._data.closed:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()

    def save(self, model_path: Path, graph_name: str, metadata: dict[str, str] | None = None) -> None:
        self.close_data()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="dsexport",
        )
        model.ir_version = 8 if self.opset <= 17 else 10  # IR 10: INT4 (opset 21)
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        Path(model_path).write_bytes(model.SerializeToString())
