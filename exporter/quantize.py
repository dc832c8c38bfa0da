"""Block-wise weight quantization: int8 / int4, one fp32 scale (and optionally a zero point) per block of K.

A weight [.., N, K] (torch layout: out x in) is cut along K into blocks of `block_size`. Schemes
(QuantConfig.scheme), all stored as unsigned q in 0..2^bits-1:

  absmax      (default) d = (the block's signed absmax) / -2^(bits-1), q = clamp(round(w / d) +
              2^(bits-1)): the largest-magnitude weight lands exactly on -2^(bits-1), so all
              2^bits levels are used, as llama.cpp's q4_0/q8_0 do. Dequantized (q - 2^(bits-1)) * d.
  symmetric   d = absmax / (2^(bits-1) - 1) > 0, levels -(2^(bits-1)-1)..2^(bits-1)-1: what
              TensorRT takes (positive scales, zero points zero; onnx-tensorrt's Q/DQ importer).
  asymmetric  d = (max - min) / (2^bits - 1) and a zero point z per block (zero exact):
              (q - z) * d. ONNX Runtime's MatMulNBits and QMoE take the zero points as an input.

The first two are ONNX Runtime's MatMulNBits/QMoE convention with the default zero point
(checked in tests/test_quantize.py), so the graph computes with exactly the weights
`dequantize_rows` returns; the reference model takes the same dequantized weights
(`fake_quantize`) to check the lowering. `per_channel_bits` widths use one block per row (K):
TensorRT's INT8 weights are per channel (its block quantization is INT4 weight-only).

Which parts are quantized (QuantConfig.bits): attention projections, shared experts, routed
experts, dense MLPs, the output head; the router (and the correction bias), norms, the absorbed
W_UK/W_UV (3-D batched MatMuls) and the embedding table stay fp32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dsexport.errors import UserError

PARTS = ("attention", "shared_experts", "routed_experts", "dense_mlp", "lm_head")
BLOCK_SIZES = (32, 64, 128)
SCHEMES = ("absmax", "symmetric", "asymmetric")
PRESETS = {
    "fp32": {},
    "int8": {p: 8 for p in PARTS},
    # the output head at 8 bits, as llama.cpp's q4_0 keeps its output tensor at higher precision
    "int4": {"attention": 4, "shared_experts": 4, "routed_experts": 4, "dense_mlp": 4, "lm_head": 8},
}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    bits: dict[str, int] = dataclasses.field(default_factory=dict)  # part -> 4 | 8; absent: fp32
    block_size: int = 32
    # Routed experts' block, when it must differ: ONNX Runtime's QMoE takes no padding, so its
    # block must divide hidden_size and moe_intermediate_size (`for_model` picks it).
    expert_block_size: int | None = None
    # Activations of the quantized projections (MatMulNBits): "int8" quantizes them per block,
    # symmetric (accuracy_level 4: ONNX Runtime's fast int8 kernels, as llama.cpp quantizes its
    # activations to q8); "fp32" keeps them (accuracy_level 0: exact, but ONNX Runtime 1.32's
    # 8-bit path then dequantizes every call and is ~50x slower). int8 experts (QMoE) always
    # quantize their activations in ONNX Runtime 1.32.
    activations: str = "int8"
    # Per-expert widths overriding routed_experts: {layer: {original expert id: 4 | 8}}
    # (calibration.pruning.plan_expert_bits picks them; docs/quantization.md).
    expert_bits: dict[int, dict[int, int]] = dataclasses.field(default_factory=dict)
    scheme: str = "absmax"  # see the module docstring
    per_channel_bits: tuple[int, ...] = ()  # widths quantized with one scale per output row
    # "ort": MatMulNBits / QMoE (CPU targets); "qdq": DequantizeLinear on constant weights, then
    # standard ops (TensorRT targets; exporter/qdq.py)
    lowering: str = "ort"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise UserError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.activations not in ("int8", "fp32"):
            raise UserError(f"activations must be int8 or fp32, got {self.activations!r}")
        if self.expert_block_size is not None and self.expert_block_size not in BLOCK_SIZES:
            raise UserError(f"expert block size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                            f"got {self.expert_block_size}")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        for part, b in self.bits.items():
            if part not in PARTS or b not in (4, 8):
                raise UserError(f"quantization: {part}={b}; parts are {', '.join(PARTS)}, bits 4 or 8")

    @classmethod
    def preset(cls, precision: str, block_size: int = 32, overrides: dict[str, int | None] | None = None,
               activations: str = "int8") -> "QuantConfig":
        if precision not in PRESETS:
            raise UserError(f"precision {precision!r}: quantized presets are {', '.join(PRESETS)}")
        bits = dict(PRESETS[precision])
        for part, b in (overrides or {}).items():
            if b is None:
                bits.pop(part, None)
            else:
                bits[part] = b
        return cls(bits, block_size, activations=activations)

    @property
    def active(self) -> bool:
        return bool(self.bits)

    def bits_for_expert(self, layer: int, expert_id: int) -> int | None:
        return self.expert_bits.get(layer, {}).get(expert_id, self.bits.get("routed_experts"))

    def block_for(self, part: str) -> int:
        return self.expert_block_size or self.block_size if part == "routed_experts" else self.block_size

    def layout_for(self, part: str, bits: int, K: int) -> tuple[int, int]:
        """(bits, block) of a [.., K] weight of this part (block K: one scale per row). Q/DQ
        weights cannot be padded: one whose K the block does not divide is int8 per channel."""
        return weight_layout(bits, self.block_for(part), K, self.per_channel_bits, self.lowering == "qdq")

    def for_model(self, hidden: int, moe_intermediate: int) -> "QuantConfig":
        """This config with the routed experts' block set to the largest of the requested one
        (expert_block_size, else block_size), 64, 32 that divides both dimensions (the fused
        QMoE op cannot pad)."""
        if "routed_experts" not in self.bits or self.lowering == "qdq":
            return self
        requested = self.expert_block_size or self.block_size
        for block in sorted({b for b in BLOCK_SIZES if b <= requested}, reverse=True):
            if hidden % block == 0 and moe_intermediate % block == 0:
                return dataclasses.replace(self, expert_block_size=block)
        raise UserError(f"quantized routed experts need hidden_size ({hidden}) and moe_intermediate_size "
                        f"({moe_intermediate}) to be multiples of 32; use --quantize routed_experts=none")

    def to_json(self) -> dict:
        return {"bits": dict(self.bits), "block_size": self.block_size,
                "expert_block_size": self.block_for("routed_experts"), "symmetric": self.scheme != "asymmetric",
                "scheme": self.scheme, "per_channel_bits": list(self.per_channel_bits), "lowering": self.lowering,
                "scale_dtype": "float32", "method": "round-to-nearest", "activations": self.activations,
                "expert_bits": {str(layer): {str(e): b for e, b in sorted(m.items())}
                                for layer, m in sorted(self.expert_bits.items())}}

    @classmethod
    def from_json(cls, data: dict) -> "QuantConfig":
        return cls(dict(data["bits"]), data["block_size"], data.get("expert_block_size"), data.get("activations", "fp32"),
                   {int(layer): {int(e): b for e, b in m.items()} for layer, m in data.get("expert_bits", {}).items()},
                   data.get("scheme", "absmax"), tuple(data.get("per_channel_bits", ())), data.get("lowering", "ort"))


def weight_layout(bits: int, block: int, K: int, per_channel_bits: tuple[int, ...], qdq: bool) -> tuple[int, int]:
    """QuantConfig.layout_for with its fields spelled out (the MoE lowerings hold them loose)."""
    if bits in per_channel_bits:
        return bits, K
    if qdq and K % block:
        return 8, K
    return bits, block


def part_of(reference_name: str) -> str | None:
    """The part a reference-layout weight belongs to (None: kept fp32)."""
    if reference_name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in f".{reference_name}" and reference_name.endswith(".weight") and "layernorm" not in reference_name \
            and "kv_b_proj" not in reference_name:
        return "attention"
    if reference_name.startswith("mlp.shared."):
        return "shared_experts" if "proj" in reference_name else None
    if reference_name in ("mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        return "routed_experts"
    if reference_name.startswith("mlp.") and reference_name.endswith("proj.weight"):
        return "dense_mlp"
    return None


def quantize_rows(w: np.ndarray, bits: int, block: int, scheme: str = "absmax"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w [.., N, K] float -> (q uint8 [.., N, Kp] in 0..2^bits-1, scales float32 [.., N, Kp/block],
    zero points uint8 [.., N, Kp/block] or None (the default, 2^(bits-1))); K padded with zeros
    to Kp, a multiple of block."""
    w = np.asarray(w, np.float32)
    K = w.shape[-1]
    pad = -K % block
    if pad:
        w = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), np.float32)], axis=-1)
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // block, block))
    half, top = 1 << (bits - 1), (1 << bits) - 1
    zero = None
    if scheme == "absmax":
        idx = np.abs(blocks).argmax(-1)[..., None]
        d = (np.take_along_axis(blocks, idx, -1)[..., 0] / -half).astype(np.float32)
    elif scheme == "symmetric":
        d = (np.abs(blocks).max(-1) / (half - 1)).astype(np.float32)
    else:  # asymmetric: the range always holds 0, so a zero weight stays exactly zero
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        d = ((hi - lo) / top).astype(np.float32)
        safe = np.where(d == 0, np.float32(1), d)
        zero = np.clip(np.rint(-lo / safe), 0, top).astype(np.uint8)
    safe = np.where(d == 0, np.float32(1), d)
    offset = zero[..., None].astype(np.float32) if zero is not None else half
    q = np.clip(np.rint(blocks / safe[..., None]) + offset, 0, top).astype(np.uint8)
    return q.reshape(w.shape), d, zero


def dequantize_rows(q: np.ndarray, scales: np.ndarray, bits: int, block: int, K: int,
                    zero: np.ndarray | None = None) -> np.ndarray:
    offset = zero[..., None].astype(np.float32) if zero is not None else float(1 << (bits - 1))
    blocks = q.reshape(q.shape[:-1] + (q.shape[-1] // block, block)).astype(np.float32) - offset
    return (blocks * scales[..., None]).reshape(q.shape)[..., :K]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values -> bytes: 8-bit as is; 4-bit two per byte, the even index in the low nibble."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [.., blocks] -> ONNX Runtime's layout: 8-bit as is; 4-bit two per byte per
    row, an odd block count padded with one nibble."""
    if bits == 4 and zero.shape[-1] % 2:
        zero = np.concatenate([zero, np.zeros(zero.shape[:-1] + (1,), np.uint8)], axis=-1)
    return pack(zero, bits)


def fake_quantize(name: str, tensor: torch.Tensor, quant: QuantConfig | None, layer: int | None = None,
                  expert_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """The weights the quantized graph computes with, for the reference model (routed experts:
    each at its own width when quant.expert_bits says so; pass the layer and its expert ids)."""
    part = part_of(name) if quant is not None else None
    if part == "routed_experts" and layer is not None and quant.expert_bits.get(layer):
        return torch.stack([fake_quantize(name, tensor[slot], dataclasses.replace(
            quant, bits={**quant.bits, "routed_experts": quant.bits_for_expert(layer, e)}, expert_bits={}))
            if quant.bits_for_expert(layer, e) else tensor[slot] for slot, e in enumerate(expert_ids)])
    bits = quant.bits.get(part) if part else None
    if bits is None:
        return tensor
    w = tensor.detach().float().numpy()
    bits, block = quant.layout_for(part, bits, w.shape[-1])
    q, d, zero = quantize_rows(w, bits, block, quant.scheme)
    return torch.from_numpy(dequantize_rows(q, d, bits, block, w.shape[-1], zero))
