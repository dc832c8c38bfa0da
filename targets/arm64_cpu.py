"""64-bit Arm CPUs (Linux SBCs, Graviton, Apple silicon under Linux) with ONNX Runtime's CPU EP.

The same graph as x86-cpu (the fused MoE op runs on Arm's MLAS kernels too). Expert shards: 2,
as measured on x86 (docs/lowering.md); not measured on Arm.

Boards with a known memory size get a memory plan, and a paged bundle by default when their
memory cannot hold every expert (docs/paging.md). Raspberry Pi 5: BCM2712 (4x Cortex-A76),
LPDDR4X-4267 on a 32-bit bus, so 4267 MT/s x 4 bytes = 17.1 GB/s peak (Raspberry Pi's product
brief; to be re-checked on a board); "usable" leaves ~1 GB to the OS.
"""

from .registry import Device, Target, register

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


for _gb in (8, 16):
    register(Target(
        name=f"raspberry-pi-5-{_gb}gb",
        description=f"Raspberry Pi 5 {_gb}GB (4x Cortex-A76, 17 GB/s), ONNX Runtime CPU execution provider",
        backend="onnxruntime",
        execution_providers=("CPUExecutionProvider",),
        moe_lowering="ort-moe",
        precisions=("fp32", "int8", "int4"),
        default_precision="int4",
        moe_shards=2,
        device=Device(memory_gb=_gb, usable_gb=_gb - 1.0, bandwidth_gbs=17.1, software="Raspberry Pi OS (64-bit)"),
        context_default=4096,
    ))
