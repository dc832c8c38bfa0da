"""Device targets. Importing this package registers every target module."""

from . import arm64_cpu, cuda_gpu, jetson, mobile, x86_cpu  # noqa: F401  (each registers its profiles)
from .registry import ALIASES, TARGETS, Device, Target, get_target, register, resolve_target_name

__all__ = ["ALIASES", "TARGETS", "Device", "Target", "get_target", "register", "resolve_target_name"]
