"""Keeping memory-mapped weights resident: lock the pages ONNX Runtime mapped from a file."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from dsexport.core.errors import UserError


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, length) of this process's mappings of `path`, from /proc/self/maps."""
    target = str(Path(path).resolve())
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end - start))
    return ranges


def lock_mapped_file(path: Path) -> int:
    """mlock every mapping of `path`; returns bytes locked. Fails clearly when not permitted."""
    if not os.path.exists("/proc/self/maps"):
        raise UserError("weights='mlock' needs Linux (/proc/self/maps); use 'memory' instead")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    locked = 0
    for start, length in mapped_ranges(path):
        if libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(length)) != 0:
            err = ctypes.get_errno()
            raise UserError(f"cannot lock {length >> 20} MiB of weights in memory ({os.strerror(err)}); "
                            "raise the memory-lock limit (ulimit -l) or use weights='memory'")
        locked += length
    return locked


def available_bytes() -> int | None:
    """Memory the kernel says a process can still take without swapping (MemAvailable), or None
    where it does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
