"""Device targets. Importing this package registers every target module."""

from . import jetson, x86_cpu  # noqa: F401  (each registers its profiles)
from .registry import ALIASES, TARGETS, Device, Target, get_target, register

__all__ = ["ALIASES", "TARGETS", "Device", "Target", "get_target", "register"]
