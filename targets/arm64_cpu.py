"""64-bit Arm CPUs (Linux SBCs, Graviton, Apple silicon under Linux) with ONNX Runtime's CPU EP.

The same graph as x86-cpu (the fused MoE op runs on Arm's MLAS kernels too). Expert shards: 2,
as measured on x86 (docs/lowering.md); not measured on Arm.
"""

from .registry import Target, register

ARM64_CPU = register(Target(
    name="arm64-cpu",
    description="64-bit Arm CPU, ONNX Runtime CPU execution provider",
    backend="onnxruntime",
    execution_providers=("CPUExecutionProvider",),
    moe_lowering="ort-moe",
    precisions=("fp32", "int8", "int4"),
    default_precision="fp32",
    moe_shards=2,
))
