"""Device targets. Importing this package registers every target module."""

from . import x86_cpu  # noqa: F401  (registers itself)
from .registry import TARGETS, Target, get_target, register

__all__ = ["TARGETS", "Target", "get_target", "register"]
