"""Strict JSON for untrusted files: manifests, golden outputs, configs, profiles, safetensors headers.

`load_json` refuses NaN/Infinity (Python's json accepts them by default), files over a size
limit, and nesting deeper than a limit, so a hostile file cannot smuggle non-finite numbers into a
check or exhaust memory. `Fields` reads one JSON object's fields with their types and ranges
checked; every error names the file, the field's path and the problem, as one line, raised as
the caller's error type (a bad manifest is a BundleError, a bad config.json a CheckpointError).
Fields that were never read are kept (`rest`), so a section of a newer minor version round-trips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

MAX_JSON_BYTES = 64 << 20  # a manifest of a V3-sized paged bundle is ~1 MB; golden files less
MAX_DEPTH = 64
_MISSING = object()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(value, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json(text: str | bytes, where: str, error: type[UserError] = UserError) -> Any:
    """JSON text -> value; NaN, Infinity, too deep or invalid text raise `error` naming `where`."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def load_json(path: Path, error: type[UserError] = UserError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than the {max_bytes} a JSON file of dsexport may have")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, str(path), error)


def dump_json(value: Any, indent: int | None = 2) -> str:
    """JSON text; refuses NaN/Infinity so nothing dsexport writes fails its own reader."""
    return json.dumps(value, indent=indent, allow_nan=False)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


class Fields:
    """Typed access to one JSON object: `Fields(data, "manifest.json", BundleError, "graphs.decoder")`."""

    def __init__(self, data: Any, file: str, error: type[UserError], path: str = ""):
        self.file, self.error, self.path = file, error, path
        if not isinstance(data, dict):
            self.fail(f"expected an object, got {_type_name(data)}")
        self.data = data
        self._read: set[str] = set()

    # ---- errors -------------------------------------------------------------------------
    def where(self, key: str | None = None) -> str:
        path = f"{self.path}.{key}" if self.path and key is not None else (key if key is not None else self.path)
        return f"{self.file}: {path}" if path else self.file

    def fail(self, message: str, key: str | None = None):
        raise self.error(f"{self.where(key)}: {message}")

    # ---- raw access ---------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.fail("missing", key)
            return default
        return self.data[key]

    def rest(self) -> dict:
        """The fields no reader asked for (kept so a section round-trips)."""
        return {k: v for k, v in self.data.items() if k not in self._read}

    # ---- typed values -------------------------------------------------------------------
    def obj(self, key: str, default: Any = _MISSING) -> "Fields | None":
        value = self.raw(key, default)
        if value is None and default is not _MISSING:
            return None
        return Fields(value, self.file, self.error, f"{self.path}.{key}" if self.path else key)

    def int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None,
            optional: bool = False) -> int | None:
        value = self.raw(key, default)
        if value is None and (optional or default is None):
            return None
        return check_int(value, self.where(key), self.error, lo, hi)

    def float(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              optional: bool = False, lo_open: bool = False) -> float | None:
        value = self.raw(key, default)
        if value is None and (optional or default is None):
            return None
        return check_float(value, self.where(key), self.error, lo, hi, lo_open)

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None,
            optional: bool = False, max_len: int = 4096) -> str | None:
        value = self.raw(key, default)
        if value is None and (optional or default is None):
            return None
        if not isinstance(value, str):
            self.fail(f"expected a string, got {_type_name(value)}", key)
        if len(value) > max_len:
            self.fail(f"a string of {len(value)} characters; at most {max_len}", key)
        if choices is not None and value not in choices:
            self.fail(f"{value!r} is not one of {', '.join(map(repr, choices))}", key)
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(f"expected true or false, got {_type_name(value)}", key)
        return value

    def list(self, key: str, default: Any = _MISSING, max_len: int = 1 << 20, optional: bool = False) -> list | None:
        value = self.raw(key, default)
        if value is None and (optional or default is None):
            return None
        if not isinstance(value, list):
            self.fail(f"expected a list, got {_type_name(value)}", key)
        if len(value) > max_len:
            self.fail(f"a list of {len(value)} items; at most {max_len}", key)
        return value

    def ints(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None,
             max_len: int = 1 << 20, optional: bool = False) -> tuple[int, ...] | None:
        items = self.list(key, default, max_len, optional)
        if items is None:
            return None
        return tuple(check_int(v, f"{self.where(key)}[{i}]", self.error, lo, hi) for i, v in enumerate(items))

    def int_lists(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None,
                  max_len: int = 1 << 16) -> tuple[tuple[int, ...], ...] | None:
        """A list of lists of integers (e.g. expert ids per layer)."""
        outer = self.list(key, default, max_len)
        if outer is None:
            return None
        rows = []
        for i, row in enumerate(outer):
            if not isinstance(row, list) or len(row) > max_len:
                raise self.error(f"{self.where(key)}[{i}]: expected a list of integers, got {_type_name(row)}")
            rows.append(tuple(check_int(v, f"{self.where(key)}[{i}][{j}]", self.error, lo, hi) for j, v in enumerate(row)))
        return tuple(rows)

    def strs(self, key: str, default: Any = _MISSING, max_len: int = 1 << 16) -> tuple[str, ...]:
        items = self.list(key, default, max_len)
        for i, v in enumerate(items):
            if not isinstance(v, str):
                raise self.error(f"{self.where(key)}[{i}]: expected a string, got {_type_name(v)}")
        return tuple(items)

    def objs(self, key: str, default: Any = _MISSING, max_len: int = 1 << 16) -> list["Fields"]:
        items = self.list(key, default, max_len)
        base = f"{self.path}.{key}" if self.path else key
        return [Fields(v, self.file, self.error, f"{base}[{i}]") for i, v in enumerate(items)]

    def mapping(self, key: str, default: Any = _MISSING, max_len: int = 1 << 16) -> dict | None:
        value = self.raw(key, default)
        if value is None and default is not _MISSING:
            return None
        if not isinstance(value, dict):
            self.fail(f"expected an object, got {_type_name(value)}", key)
        if len(value) > max_len:
            self.fail(f"an object of {len(value)} entries; at most {max_len}", key)
        return value

    def items(self, key: str, default: Any = _MISSING, max_len: int = 1 << 16) -> Iterator[tuple[str, "Fields"]]:
        value = self.mapping(key, default, max_len) or {}
        base = f"{self.path}.{key}" if self.path else key
        for name, entry in value.items():
            yield name, Fields(entry, self.file, self.error, f"{base}.{name}")


    def entries(self, max_len: int = 1 << 16) -> Iterator[tuple[str, "Fields"]]:
        """This object's own entries, each an object."""
        if len(self.data) > max_len:
            self.fail(f"an object of {len(self.data)} entries; at most {max_len}")
        for name, entry in self.data.items():
            yield name, Fields(entry, self.file, self.error, f"{self.path}.{name}" if self.path else name)

def check_int(value, where: str, error: type[UserError] = UserError, lo: int | None = None,
              hi: int | None = None) -> int:
    """An integer (JSON 3, not 3.0 or true) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # 3.0 from a writer that prints all numbers as floats
        else:
            raise error(f"{where}: expected an integer, got {_type_name(value)} {value!r}"[:300])
    if lo is not None and value < lo:
        raise error(f"{where}: {value} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise error(f"{where}: {value} is above the maximum {hi}")
    return value


def check_float(value, where: str, error: type[UserError] = UserError, lo: float | None = None,
                hi: float | None = None, lo_open: bool = False) -> float:
    """A finite number within [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where}: expected a number, got {_type_name(value)} {value!r}"[:300])
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{where}: {value} is not a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise error(f"{where}: {value:g} must be {'greater than' if lo_open else 'at least'} {lo:g}")
    if hi is not None and value > hi:
        raise error(f"{where}: {value:g} is above the maximum {hi:g}")
    return value


def each(items, convert: Callable[[Any, str], Any], where: str) -> list:
    return [convert(v, f"{where}[{i}]") for i, v in enumerate(items)]
