"""Device targets: small declarative profiles in a registry, one module per target.

A target decides how the model is lowered (which MoE lowering, which backend), so that the
choice is made at export time and recorded in the bundle.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dsexport.core.errors import UserError


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
    backend: str  # "onnxruntime", "tensorrt" or "onnxruntime-mobile"
    execution_providers: tuple[str, ...]
    moe_lowering: str  # a key of dsexport.exporter.lowering.MOE_LOWERINGS
    precisions: tuple[str, ...]
    default_precision: str
    moe_shards: int = 1  # lowering.LoweringOptions.moe_shards: about the threads the device runs
    device: Device | None = None  # None: the machine it runs on (no fixed memory budget)
    buildable: bool = True  # False: profile and memory plan only, the backend's export is not written yet
    prefill_moe_lowering: str | None = None  # a second graph for prompts when moe_lowering is decode-only
    tensorrt_default: str | None = None  # the TensorRT version build checks against unless told
    context_default: int = 4096  # context the build plans for (memory plan, TensorRT profiles)
    onnx_opset: int = 17  # the graphs' opset (TensorRT 8.5 parses up to 17)
    attention_lowering: str = "mla-latent"  # MLA on the latent cache, W_UK/W_UV absorbed, standard ops


# The MoE lowerings the exporter writes (exporter/lowering.py registers their emitters; a test
# checks that the two agree): name -> whether it serves prompts (False: decode only, its cost
# grows as tokens x k x expert bytes).
MOE_LOWERINGS = {"ort-moe": True, "gather": False, "dense": True}


def check_lowering(name: str) -> str:
    if name not in MOE_LOWERINGS:
        raise UserError(f"unknown MoE lowering {name!r}; available: {', '.join(sorted(MOE_LOWERINGS))}")
    return name


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


ALIASES: dict[str, str] = {}
# Names resolved by looking at the machine (e.g. `jetson`: the board it runs on, else a default).
# Each resolver returns (target name, why that one).
RESOLVERS: dict[str, Callable[[], tuple[str, str]]] = {}


def resolve_target_name(name: str) -> tuple[str, str | None]:
    """(profile name, a note saying how an alias was resolved, or None)."""
    if name in RESOLVERS:
        resolved, why = RESOLVERS[name]()
        return resolved, f"--target {name} resolved to {resolved} ({why})"
    if name in ALIASES:
        return ALIASES[name], f"--target {name} resolved to {ALIASES[name]}"
    return name, None


def get_target(name: str) -> Target:
    name = resolve_target_name(name)[0]
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
