"""NVIDIA Jetson boards: shared CPU/GPU memory, TensorRT built on the device.

Memory and bandwidth are NVIDIA's figures (Orin Nano 8GB and Thor read from NVIDIA's pages,
the rest recalled in ../shared/BRIEF.md and to be re-checked); "usable" leaves ~1.5 GB (4 GB
boards: ~1 GB) to the OS, the display stack and CUDA's own context. Orin is SM 8.7 (FP16,
INT8, INT4 weight-only; no FP8), Thor SM 11.0. JetPack 5.1 ships TensorRT 8.5, JetPack 6.1/6.2
TensorRT 10.3, JetPack 7 TensorRT 10.13+.

The TensorRT export is not written yet (buildable=False): these profiles drive `dsexport plan`.
`--target jetson` resolves to DEFAULT_JETSON (see docs/targets.md).
"""

from .registry import ALIASES, Device, Target, register

ORIN_TRT = ("8.5", "10.3")
ORIN_SW = "JetPack 5.1 (TensorRT 8.5) or 6.1/6.2 (TensorRT 10.3)"
ORIN_PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _jetson(name: str, description: str, memory: float, usable: float, bandwidth: float,
            cc: str = "8.7", trt: tuple[str, ...] = ORIN_TRT, software: str = ORIN_SW,
            precisions: tuple[str, ...] = ORIN_PRECISIONS) -> Target:
    return register(Target(
        name=name, description=description, backend="tensorrt",
        execution_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"), moe_lowering="gather",
        precisions=precisions, default_precision="fp16",
        device=Device(memory, usable, bandwidth, cc, trt, software), buildable=False,
    ))


_jetson("jetson-orin-nano-4gb", "Jetson Orin Nano 4GB (34 GB/s; 51 GB/s in Super mode)", 4, 3.0, 34)
_jetson("jetson-orin-nano-8gb", "Jetson Orin Nano 8GB (68 GB/s; 102 GB/s in Super mode)", 8, 6.5, 68)
_jetson("jetson-orin-nx-8gb", "Jetson Orin NX 8GB", 8, 6.5, 102.4)
_jetson("jetson-orin-nx-16gb", "Jetson Orin NX 16GB", 16, 14.5, 102.4)
_jetson("jetson-agx-orin-32gb", "Jetson AGX Orin 32GB", 32, 30.5, 204.8)
_jetson("jetson-agx-orin-64gb", "Jetson AGX Orin 64GB", 64, 62.5, 204.8)
_jetson("jetson-thor", "Jetson AGX Thor T5000 128GB", 128, 126.0, 273, cc="11.0", trt=("10.13", "11"),
        software="JetPack 7 (TensorRT 10.13+ / 11)", precisions=("fp32", "fp16", "fp8", "int8", "int4", "fp4"))

DEFAULT_JETSON = "jetson-orin-nano-8gb"
ALIASES["jetson-orin-nano"] = DEFAULT_JETSON
ALIASES["jetson"] = DEFAULT_JETSON
