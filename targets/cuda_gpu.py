"""A desktop or server NVIDIA GPU with TensorRT: the Jetson lowering, engines built where they run.

No fixed device: memory, compute capability and TensorRT version are the machine's own, so the
memory plan has no budget to check against and `dsexport engine` records what it finds.
"""

from .registry import Target, register

CUDA_GPU = register(Target(
    name="cuda-gpu",
    description="NVIDIA GPU (desktop/server) with TensorRT 10.x/11, engine built on the machine",
    backend="tensorrt",
    execution_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    moe_lowering="gather",
    prefill_moe_lowering="dense",
    precisions=("fp32", "fp16", "bf16", "int8", "int4"),
    default_precision="fp16",
    tensorrt_default="10.13",
))
