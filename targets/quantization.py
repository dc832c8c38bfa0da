"""How a target quantizes: the one function that turns a precision and the quantization flags
into the QuantSpec a bundle for that target is built with (the build plan calls it, and the
memory plan prices other precisions with it).

  ONNX Runtime (CPUs, phones)  MatMulNBits / QMoE: absmax (q4_0-like) or, with zero points,
                               asymmetric; activations int8 (fast) or fp32 (exact)
  TensorRT (Jetson, GPUs)      DequantizeLinear on constant weights (exporter/qdq.py): symmetric
                               (TensorRT takes positive scales and no zero points), INT8 per output
                               channel, INT4 in blocks (TensorRT 10+); activations stay floating point
"""

from __future__ import annotations

import dataclasses

from dsexport.core.errors import UserError
from dsexport.core.quant import PRESETS, QuantSpec

from .registry import Target


def quant_spec_for(target: Target, precision: str, block_size: int = 32,
                   overrides: dict[str, int | None] | None = None, activations: str = "int8",
                   zero_points: bool = False, expert_block_size: int | None = None,
                   expert_bits: dict[int, dict[int, int]] | None = None) -> QuantSpec | None:
    """The bundle's quantization, or None when every weight stays floating point."""
    if target.backend == "tensorrt":
        if precision not in PRESETS and not overrides:
            return None  # fp32/fp16/bf16 engines: the graph's weights stay fp32
        if zero_points:
            raise UserError("TensorRT takes symmetric weights only (zero points must be zero); drop --zero-points")
        if expert_bits:
            raise UserError("--expert-bits (one QMoE per width) is for ONNX Runtime targets; TensorRT graphs take one "
                            "width for the routed experts")
        spec = QuantSpec.preset(precision if precision in PRESETS else "fp32", block_size, overrides, activations="fp32")
        spec = dataclasses.replace(spec, scheme="symmetric", per_channel_bits=(8,), lowering="qdq",
                                   expert_block_size=expert_block_size)
        return spec if spec.active else None
    if precision not in PRESETS:
        raise UserError(f"precision {precision} is not available for {target.backend}; choose from {', '.join(PRESETS)}")
    spec = QuantSpec.preset(precision, block_size, overrides, activations=activations)
    spec = dataclasses.replace(spec, scheme="asymmetric" if zero_points else "absmax", expert_block_size=expert_block_size)
    if expert_bits:
        if "routed_experts" not in spec.bits:
            raise UserError("--expert-bits needs quantized routed experts (--precision int4|int8)")
        spec = dataclasses.replace(spec, expert_bits=expert_bits)
    return spec if spec.active else None


def preset_spec(target: Target, precision: str) -> QuantSpec | None:
    """The target's spec for a precision with default flags (what `plan` prices alternatives at)."""
    if target.backend != "tensorrt" and precision not in PRESETS:
        return None
    return quant_spec_for(target, precision)
