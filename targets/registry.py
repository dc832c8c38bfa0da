"""Device targets: small declarative profiles in a registry, one module per target.

A target decides how the model is lowered (which MoE lowering, which backend), so that the
choice is made at export time and recorded in the bundle.
"""

from __future__ import annotations

import dataclasses

from dsexport.errors import UserError


@dataclasses.dataclass(frozen=True)
class Device:
    """Checked hardware facts of a target device (sources in the profile module)."""

    memory_gb: float  # physical memory; on Jetson it is shared by CPU and GPU
    usable_gb: float  # what one process can count on after the OS and its services
    bandwidth_gbs: float  # vendor peak memory bandwidth
    compute_capability: str | None = None  # NVIDIA GPUs
    tensorrt: tuple[str, ...] = ()  # TensorRT versions its software stack ships
    software: str = ""  # e.g. "JetPack 6.1/6.2"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str  # "onnxruntime" (buildable today) or "tensorrt" / "onnxruntime-mobile" (planned)
    execution_providers: tuple[str, ...]
    moe_lowering: str  # a key of dsexport.exporter.lowering.MOE_LOWERINGS
    precisions: tuple[str, ...]
    default_precision: str
    moe_shards: int = 1  # lowering.LoweringOptions.moe_shards: about the threads the device runs
    device: Device | None = None  # None: the machine it runs on (no fixed memory budget)
    buildable: bool = True  # False: profile and memory plan only, the backend's export is not written yet


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


ALIASES: dict[str, str] = {}


def get_target(name: str) -> Target:
    name = ALIASES.get(name, name)
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
