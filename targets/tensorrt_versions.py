"""What each TensorRT version's ONNX parser accepts, as data: no onnx or tensorrt import, so the
build plan, the engine plan and `dsexport check` on a device without onnx can all consult it
(targets/tensorrt_check.py applies the rules to a graph; its docstring gives the sources).
"""

from __future__ import annotations

import dataclasses
import re

from dsexport.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class ParserVersion:
    name: str
    table: str  # which onnx-tensorrt-*.json
    opsets: tuple[int, int]
    int64_native: bool  # False: int64 cast down to int32 (8.x); int64 graph inputs bind as int32
    extra_types: frozenset[str] = frozenset()
    tensor_axes: frozenset[str] = frozenset()  # ops whose axes may be a runtime tensor
    added_ops: frozenset[str] = frozenset()
    scatter_reduction: bool = True  # ScatterElements `reduction` (10.0+)
    strongly_typed_only: bool = False


_TENSOR_AXES_1013 = frozenset({"Slice", "Pad", "Squeeze", "Unsqueeze", "CumSum"})
_ADDED_1013 = frozenset({"BlackmanWindow", "HammingWindow", "HannWindow", "STFT"})  # 10.4, 10.5
PARSERS: dict[str, ParserVersion] = {p.name: p for p in (
    ParserVersion("8.5", "8.5", (7, 17), int64_native=False, scatter_reduction=False),
    ParserVersion("10.3", "10.1", (9, 21), int64_native=True, tensor_axes=frozenset({"Slice"})),
    ParserVersion("10.13", "10.1", (9, 21), int64_native=True, tensor_axes=_TENSOR_AXES_1013, added_ops=_ADDED_1013),
    ParserVersion("11", "10.1", (9, 21), int64_native=True, tensor_axes=_TENSOR_AXES_1013,
                  added_ops=_ADDED_1013 | {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"},
                  strongly_typed_only=True),
)}


def parser_version(version: str) -> ParserVersion:
    """'10.3', '10.3.0.26' or '11.0' -> the rules of the closest documented parser at or below it."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:2]] + [0]
    key = (parts[0], parts[1])
    known = sorted(PARSERS.values(), key=lambda p: tuple(int(x) for x in (p.name.split(".") + ["0"])[:2]))
    chosen = None
    for p in known:
        if tuple(int(x) for x in (p.name.split(".") + ["0"])[:2]) <= key:
            chosen = p
    if chosen is None:
        raise UserError(f"TensorRT {version} is older than the versions dsexport checks "
                        f"({', '.join(PARSERS)})")
    return chosen


ROUTES = {
    "tensorrt": "every node runs in the TensorRT engine",
    "ort-tensorrt-ep": "ONNX Runtime partitions the graph: TensorRT EP for what it parses, CUDA EP for the rest",
}
