"""x86-64 CPUs with ONNX Runtime's CPU execution provider.

MoE lowering: the fused com.microsoft.MoE op. Measured against the standard-op lowering by
benchmarks/moe_lowerings.py (see docs/lowering.md): it runs only the routed experts for any
token count, so one graph serves prefill and decode. Experts are split in 2 shards
(lowering.LoweringOptions): on the whole model, decode was faster in 8 of 8 interleaved rounds.
"""

from .registry import Target, register

X86_CPU = register(Target(
    name="x86-cpu",
    description="x86-64 CPU, ONNX Runtime CPU execution provider",
    backend="onnxruntime",
    execution_providers=("CPUExecutionProvider",),
    moe_lowering="ort-moe",
    precisions=("fp32", "int8", "int4"),
    default_precision="fp32",
    moe_shards=2,
))
