"""x86-64 CPUs with ONNX Runtime's CPU execution provider.

MoE lowering: the fused com.microsoft.MoE op. Measured against the standard-op lowering by
benchmarks/moe_lowerings.py (see docs/lowering.md): it runs only the routed experts for any
token count, so one graph serves prefill and decode. Expert shards (lowering.LoweringOptions)
stay at 1: an interleaved A/B on the 2-core development machine showed no decode gain.
"""

from .registry import Target, register

X86_CPU = register(Target(
    name="x86-cpu",
    description="x86-64 CPU, ONNX Runtime CPU execution provider",
    backend="onnxruntime",
    execution_providers=("CPUExecutionProvider",),
    moe_lowering="ort-moe",
    precisions=("fp32",),
    default_precision="fp32",
    moe_shards=1,
))
