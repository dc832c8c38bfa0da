"""Layers x experts heatmaps as PNG, written with the standard library (zlib + struct).

One row per MoE layer (top: the first), one column per original expert id; color from dark
blue (lowest of the map) through green to yellow (highest), on a per-map linear scale; grey
cells are experts the layer no longer holds. A legend strip under the map runs from the lowest
to the highest value. The numbers themselves are in profile.json.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# viridis-like anchors (low -> high)
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
_MISSING = (160, 160, 160)
CELL, GAP = 14, 1


def _colors(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB uint8 [..., 3]."""
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return (_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).round().astype(np.uint8)


def _png(path: Path, rgb: np.ndarray) -> None:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_heatmap(path: Path, matrix: np.ndarray) -> None:
    """matrix [layers, experts] of values, NaN where the layer does not hold the expert."""
    matrix = np.asarray(matrix, float)
    rows, cols = matrix.shape
    finite = matrix[np.isfinite(matrix)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = (matrix - lo) / (hi - lo) if hi > lo else np.zeros_like(matrix)
    step = CELL + GAP
    legend_h = CELL
    img = np.full((rows * step + GAP + legend_h + 2 * GAP, cols * step + GAP, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            color = _MISSING if not np.isfinite(matrix[r, c]) else _colors(scaled[r, c])
            img[GAP + r * step: GAP + r * step + CELL, GAP + c * step: GAP + c * step + CELL] = color
    top = rows * step + 2 * GAP
    ramp = _colors(np.linspace(0, 1, img.shape[1] - 2 * GAP))
    img[top: top + legend_h, GAP: img.shape[1] - GAP] = ramp[None]
    _png(Path(path), img)
