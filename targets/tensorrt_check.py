"""Static TensorRT compatibility check of an ONNX graph: runs anywhere, no TensorRT needed.

What a TensorRT version's ONNX parser accepts comes from onnx-tensorrt's operator tables
(targets/data/onnx-tensorrt-*.json, extracted from docs/operators.md of the release branches)
plus the parser changes its changelog lists for the versions whose table is not published:

  8.5    JetPack 5.1   table of branch 8.5-GA. Opsets <= 17. INT64 is cast down to INT32; no
                       BF16/INT4. TopK's K must be an initializer. IsInf arrives in 8.6.
  10.3   JetPack 6.x   table of branch 10.1-GA (10.0 docs: opsets 9..20) + 10.3's "tensor axes
                       inputs for Slice". Opset 21 is accepted for INT4 weights: the importer
                       has no opset ceiling, takes DequantizeLinear by name and infers blocks
                       from the scale's rank, and NVIDIA's ModelOpt exports INT4 at opset 21.
  10.13  JetPack 7     10.3 + tensor axes for Pad (10.4), Squeeze/Unsqueeze (10.7), CumSum (10.8).
  11     JetPack 7.x   10.13 + Attention (10.14), RMSNormalization/RotaryEmbedding/TensorScatter
                       (10.15); strongly typed networks only (no FP16/INT8 builder flags).

Rules checked per node: the op is in the table and marked supported; its data tensor's type is
one the table lists; the restrictions the table states ("`axes` must be an initializer",
"`K` ... initializer", "`sorted` must be 1", "K < 3840", ScatterND without reduction, zero
points zero); opset range. Nodes of other domains (com.microsoft) are not parseable by
TensorRT: under the "ort-tensorrt-ep" route ONNX Runtime partitions them to its CUDA execution
provider and the report lists them with where they run; under the "tensorrt" route they fail.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

from dsexport.core.errors import UserError

from .profiles import profile_problems
from .tensorrt_versions import PARSERS, ROUTES, ParserVersion, parser_version  # noqa: F401

DATA_DIR = Path(__file__).parent / "data"



_DTYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
                TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
                TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
                TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8"}
# which input carries the data whose type the table's "Supported Types" column constrains
_DATA_INPUT = {"Where": 1, "Expand": 0, "Range": 0}
_OUTSIDE_WHERE = "CUDAExecutionProvider (ONNX Runtime, outside TensorRT)"


@dataclasses.dataclass(frozen=True)
class Finding:
    node: str
    op: str
    message: str


@dataclasses.dataclass
class CheckReport:
    graph: str
    tensorrt: str
    route: str
    nodes: int
    errors: list[Finding]
    outside: list[Finding]  # nodes that run outside TensorRT (route ort-tensorrt-ep), and where
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"graph": self.graph, "tensorrt": self.tensorrt, "route": self.route, "nodes": self.nodes,
                "ok": self.ok, "errors": [dataclasses.asdict(f) for f in self.errors],
                "outside_tensorrt": [dataclasses.asdict(f) for f in self.outside], "notes": self.notes}

    def lines(self) -> list[str]:
        head = (f"{self.graph}: TensorRT {self.tensorrt} ({self.route}): {self.nodes} nodes, "
                + ("every TensorRT node parseable" if self.ok else f"{len(self.errors)} not parseable"))
        out = [head]
        out += [f"  error: node {f.node} ({f.op}): {f.message}" for f in self.errors]
        out += [f"  outside TensorRT: node {f.node} ({f.op}) runs on {f.message}" for f in self.outside]
        out += [f"  note: {n}" for n in self.notes]
        return out


@functools.lru_cache(maxsize=None)
def _table(name: str) -> dict:
    return json.loads((DATA_DIR / f"onnx-tensorrt-{name}.json").read_text())["operators"]


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If branches, Loop bodies) inside it."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _nodes(graph: onnx.GraphProto):
    for g in _graphs(graph):
        yield from g.node


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    consts = {}
    for g in _graphs(graph):
        consts.update({t.name: t for t in g.initializer})
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        consts[node.output[0]] = a.t
    return consts


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    types = {}
    for g in _graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
    return types


def _input_index(op: str, opset: int, input_name: str) -> int | None:
    try:
        schema = onnx.defs.get_schema(op, opset)
    except Exception:  # noqa: BLE001  (an op unknown to this onnx: no index)
        return None
    names = [i.name for i in schema.inputs]
    return names.index(input_name) if input_name in names else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_model(model: onnx.ModelProto, version: str, route: str = "tensorrt", graph_name: str = "graph") -> CheckReport:
    """Check a loaded ModelProto (external data need not be loaded) against a parser version."""
    if route not in ROUTES:
        raise UserError(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    rules = parser_version(version)
    table = _table(rules.table)
    report = CheckReport(graph_name, rules.name, route, sum(1 for _ in _nodes(model.graph)), [], [], [])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    lo, hi = rules.opsets
    if not lo <= opset <= hi:
        report.errors.append(Finding("(model)", "opset", f"opset {opset} is outside TensorRT {rules.name}'s {lo}..{hi}"))
    consts = _constants(model.graph)
    types = _value_types(model)
    allowed_extra = {"INT64"} if not rules.int64_native else set()

    def fail(node, message):
        report.errors.append(Finding(node.name or node.output[0], node.op_type, message))

    for node in _nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            if route == "ort-tensorrt-ep":
                report.outside.append(Finding(node.name or node.output[0], f"{node.domain}.{node.op_type}", _OUTSIDE_WHERE))
            else:
                fail(node, f"domain {node.domain} is not ONNX: TensorRT's parser has no importer for it "
                           "(it would need a plugin)")
            continue
        entry = table.get(node.op_type)
        supported = node.op_type in rules.added_ops or (entry is not None and entry["supported"])
        if not supported:
            fail(node, f"TensorRT {rules.name} cannot parse {node.op_type}")
            continue
        if entry is None:
            continue
        # data type of the tensor the table's type column is about
        k = _DATA_INPUT.get(node.op_type, 0)
        if node.input and len(node.input) > k and node.input[k] and entry["types"]:
            dtype = types.get(node.input[k])
            name = _DTYPE_NAMES.get(dtype) if dtype else None
            ok_types = set(entry["types"]) | (allowed_extra if "INT32" in entry["types"] else set())
            if "FP32" in ok_types:
                ok_types.add("DOUBLE")  # cast down to FP32 by the parser
            if name and name not in ok_types:
                fail(node, f"input {node.input[k]} is {name}; TensorRT {rules.name} takes {', '.join(entry['types'])}")
        _check_restrictions(node, entry["restrictions"], rules, consts, opset, fail)
    if not rules.int64_native and any(i.type.tensor_type.elem_type == TensorProto.INT64 for i in model.graph.input):
        report.notes.append("int64 graph inputs are bound as int32 by TensorRT 8.x (the engine plan says so)")
    return report


def _check_restrictions(node, restrictions: str, rules: ParserVersion, consts, opset: int, fail) -> None:
    op = node.op_type
    # "`axes` must be an initializer" / "`K` input must be an initializer" / "must be a constant tensor"
    for name in re.findall(r"`(\w+)`(?: input)? must be (?:an initializer|a constant tensor)", restrictions):
        if name == "axes" and op in rules.tensor_axes:
            continue
        idx = _input_index(op, opset, name)
        if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
            fail(node, f"input `{name}` ({node.input[idx]}) must be an initializer or Constant for TensorRT {rules.name}")
    if op == "TopK":
        if not rules.int64_native and (len(node.input) < 2 or node.input[1] not in consts):
            fail(node, f"K must be an initializer for TensorRT {rules.name}")
        if _attr(node, "sorted", 1) != 1:
            fail(node, "sorted must be 1")
        if len(node.input) > 1 and node.input[1] in consts:
            k = int(onnx.numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
            if k >= 3840:
                fail(node, f"K = {k}; TensorRT takes K < 3840")
    if op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
        fail(node, "ScatterND with a reduction is not supported")
    if op == "ScatterElements" and not rules.scatter_reduction and _attr(node, "reduction", b"none") not in (b"none", "none"):
        fail(node, f"ScatterElements reduction needs TensorRT 10.0+, not {rules.name}")
    if op == "DequantizeLinear" and node.input[0] in consts:  # weight-only quantization of a constant
        data, scale = consts[node.input[0]], consts.get(node.input[1])
        if scale is None:
            fail(node, "the scale must be an initializer (TensorRT takes no dynamic-shape scales)")
        elif len(scale.dims) not in (0, 1, len(data.dims)):
            fail(node, f"scale of rank {len(scale.dims)}: TensorRT takes a scalar, one per channel, or the input's rank (blocks)")
        elif len(scale.dims) == len(data.dims) > 1:
            blocked = sum(d != s for d, s in zip(data.dims, scale.dims))
            if blocked != 1:
                fail(node, "block quantization along exactly one axis")
            if not rules.int64_native:  # 8.x: no block quantization
                fail(node, f"block quantization needs TensorRT 10+, not {rules.name}")
        if data.data_type == TensorProto.INT4 and data.dims and data.dims[-1] % 2:
            fail(node, "INT4 needs an even last dimension (TensorRT packs two per byte)")
    if op in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 2 and node.input[2]:
        zp = consts.get(node.input[2])
        if zp is None or onnx.numpy_helper.to_array(zp).any():
            fail(node, "zero point must be a constant zero")


def check_file(path: Path, version: str, route: str = "tensorrt") -> CheckReport:
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, version, route, Path(path).name)


def check_profiles(model: onnx.ModelProto, profiles: list[dict], graph_name: str) -> list[str]:
    """profile_problems for an ONNX graph's inputs (symbolic dims are dynamic)."""
    inputs = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
              for v in model.graph.input}
    return profile_problems(graph_name, inputs, profiles)
