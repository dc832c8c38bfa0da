"""Device targets: small declarative profiles in a registry, one module per target.

A target decides how the model is lowered (which MoE lowering, which backend), so that the
choice is made at export time and recorded in the bundle.
"""

from __future__ import annotations

import dataclasses

from dsexport.errors import UserError


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str  # "onnxruntime"
    execution_providers: tuple[str, ...]
    moe_lowering: str  # a key of dsexport.exporter.lowering.MOE_LOWERINGS
    precisions: tuple[str, ...]
    default_precision: str
    moe_shards: int = 1  # lowering.LoweringOptions.moe_shards: about the threads the device runs


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; available targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
