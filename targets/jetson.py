"""NVIDIA Jetson boards: shared CPU/GPU memory, TensorRT engines built on the device.

Memory and bandwidth are NVIDIA's figures (Orin Nano 8GB and Thor read from NVIDIA's pages,
the rest recalled in ../shared/BRIEF.md and to be re-checked); "usable" leaves ~1.5 GB (4 GB
boards: ~1 GB) to the OS, the display stack and CUDA's own context. Orin is SM 8.7 (FP16,
INT8, INT4 weight-only; no FP8), Thor SM 11.0. JetPack 5.1 ships TensorRT 8.5, JetPack 6.1/6.2
TensorRT 10.3, JetPack 7 TensorRT 10.13+.

Lowering (docs/tensorrt.md): standard ONNX ops only, so every node runs inside TensorRT and the
same graphs run in ONNX Runtime on any machine to check them. Two graphs over one weight file:
decode gathers the routed experts' stacked weights (`gather`), prompts run every expert once
(`dense`). `--target jetson` resolves to the board dsexport runs on, else DEFAULT_JETSON.
"""

from __future__ import annotations

from pathlib import Path

from .registry import ALIASES, RESOLVERS, TARGETS, Device, Target, register

ORIN_TRT = ("8.5", "10.3")
ORIN_SW = "JetPack 5.1 (TensorRT 8.5) or 6.1/6.2 (TensorRT 10.3)"
ORIN_PRECISIONS = ("fp32", "fp16", "int8", "int4")
TRT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _jetson(name: str, description: str, memory: float, usable: float, bandwidth: float,
            cc: str = "8.7", trt: tuple[str, ...] = ORIN_TRT, software: str = ORIN_SW,
            precisions: tuple[str, ...] = ORIN_PRECISIONS, trt_default: str = "10.3", context: int = 4096) -> Target:
    return register(Target(
        name=name, description=description, backend="tensorrt", execution_providers=TRT_PROVIDERS,
        moe_lowering="gather", prefill_moe_lowering="dense", precisions=precisions, default_precision="fp16",
        device=Device(memory, usable, bandwidth, cc, trt, software), tensorrt_default=trt_default,
        context_default=context,
    ))


_jetson("jetson-orin-nano-4gb", "Jetson Orin Nano 4GB (34 GB/s; 51 GB/s in Super mode)", 4, 3.0, 34, context=2048)
_jetson("jetson-orin-nano-8gb", "Jetson Orin Nano 8GB (68 GB/s; 102 GB/s in Super mode)", 8, 6.5, 68)
_jetson("jetson-orin-nx-8gb", "Jetson Orin NX 8GB", 8, 6.5, 102.4)
_jetson("jetson-orin-nx-16gb", "Jetson Orin NX 16GB", 16, 14.5, 102.4)
_jetson("jetson-agx-orin-32gb", "Jetson AGX Orin 32GB", 32, 30.5, 204.8)
_jetson("jetson-agx-orin-64gb", "Jetson AGX Orin 64GB", 64, 62.5, 204.8)
_jetson("jetson-thor", "Jetson AGX Thor T5000 128GB", 128, 126.0, 273, cc="11.0", trt=("10.13", "11"),
        software="JetPack 7 (TensorRT 10.13+ / 11)", precisions=("fp32", "fp16", "fp8", "int8", "int4", "fp4"),
        trt_default="10.13")

DEFAULT_JETSON = "jetson-orin-nano-8gb"
ALIASES["jetson-orin-nano"] = DEFAULT_JETSON
_FAMILIES = (("thor", "jetson-thor"), ("agx orin", "jetson-agx-orin"), ("orin nx", "jetson-orin-nx"),
             ("orin nano", "jetson-orin-nano"))


def detect_board(model: str, mem_total_bytes: int) -> str | None:
    """The profile of a Jetson from its device-tree model string and MemTotal, or None.

    The family comes from the model string ("NVIDIA Jetson Orin Nano Developer Kit", ...); the
    memory size is the smallest of the family's sizes at least MemTotal (the kernel reports a
    little less than the module's nominal memory).
    """
    text = model.lower().replace("\x00", "")
    if "jetson" not in text and "thor" not in text and "orin" not in text:
        return None
    for key, family in _FAMILIES:
        if key in text:
            sizes = sorted((t.device.memory_gb, n) for n, t in TARGETS.items() if n.startswith(family))
            for size, name in sizes:
                if mem_total_bytes <= size * 1e9 * 1.074:  # nominal sizes are GiB-ish; MemTotal is less
                    return name
            return sizes[-1][1]
    return None


def _resolve_jetson() -> tuple[str, str]:
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace")
        meminfo = Path("/proc/meminfo").read_text()
        mem = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal:"))) * 1024
    except (OSError, StopIteration, ValueError):
        return DEFAULT_JETSON, "the default Jetson profile: this machine is not a Jetson"
    board = detect_board(model, mem)
    if board is None:
        return DEFAULT_JETSON, "the default Jetson profile: this machine is not a Jetson"
    return board, f"detected: {model.strip(chr(0)).strip()}, {mem / 2**30:.1f} GiB"


RESOLVERS["jetson"] = _resolve_jetson
