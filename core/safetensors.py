"""safetensors headers read and checked without torch (the format: an 8-byte little-endian header
length, a JSON header, then the tensors' bytes).

The checks are the safetensors library's own (safetensors/src/tensor.rs, `validate`): every entry
has a known dtype, a shape of non-negative dimensions, offsets [start, end] with end - start equal
to the shape's byte size, and the entries tile the data section: sorted by offset, each starts
where the previous one ended and the last ends at the end of the file (no overlaps, no gaps, no
bytes beyond the header's claims). A header of a hostile size is refused before it is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path

from .errors import CheckpointError
from .jsonio import parse_json

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_DIMS = 8


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_offset: int  # where the data section starts in the file
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path, fd: int | None = None) -> SafetensorsHeader:
    """The checked header of a safetensors file (fd: an open descriptor of it, else it is opened)."""
    path = Path(path)
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a readable safetensors file (header length {header_len} beyond the file "
                                  f"or the {MAX_HEADER_BYTES}-byte limit)")
        raw = os.pread(fd, header_len, 8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    finally:
        if own and fd is not None:
            os.close(fd)
    header = parse_json(raw, f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the safetensors __metadata__ is not a map of strings")
    data_offset = 8 + header_len
    tensors = {name: _entry(path, name, entry) for name, entry in header.items()}
    _check_tiling(path, tensors, size - data_offset)
    return SafetensorsHeader(path, data_offset, tensors, dict(metadata))


def _entry(path: Path, name: str, entry) -> TensorEntry:
    where = f"{path}: tensor {name[:120]!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise CheckpointError(f"{where}: unknown dtype {str(dtype)[:20]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
        raise CheckpointError(f"{where}: shape {str(shape)[:80]} is not a list of non-negative dimensions")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 1 << 50 for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {str(offsets)[:80]} are not [start, end] with start <= end")
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape} "
                              f"({expected} bytes)")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(path: Path, tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            what = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name[:120]!r} {what} (offset {entry.start}, expected {position})")
        position = entry.end
    if position != data_bytes:
        raise CheckpointError(f"{path}: the tensors cover {position} bytes of a {data_bytes}-byte data section "
                              "(truncated, or bytes the header does not describe)")


INDEX_FILE = "model.safetensors.index.json"


def checkpoint_tensors(directory: Path) -> dict[str, Path]:
    """{tensor name: shard} of a checkpoint directory: from its index (shard names confined to the
    directory), else from every *.safetensors file's header. No tensor is read."""
    from .files import confined
    from .jsonio import load_json

    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = load_json(index_path, CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map of file names)")
        shards = {name: confined(directory, name, f"{index_path}: weight_map", CheckpointError)
                  for name in sorted(set(weight_map.values()))}
        return {tensor: shards[name] for tensor, name in weight_map.items()}
    where = {}
    for file in sorted(directory.glob("*.safetensors")):
        file = confined(directory, file.name, str(directory), CheckpointError)
        for name in read_header(file).tensors:
            where[name] = file
    return where
