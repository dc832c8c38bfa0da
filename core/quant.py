"""Block-wise weight quantization: the spec a bundle is built with, and the numpy arithmetic.

A weight [.., N, K] (torch layout: out x in) is cut along K into blocks of `block_size`. Schemes
(QuantSpec.scheme), all stored as unsigned q in 0..2^bits-1:

  absmax      (default) d = (the block's signed absmax) / -2^(bits-1), q = clamp(round(w / d) +
              2^(bits-1)): the largest-magnitude weight lands exactly on -2^(bits-1), so all
              2^bits levels are used, as llama.cpp's q4_0/q8_0 do. Dequantized (q - 2^(bits-1)) * d.
  symmetric   d = absmax / (2^(bits-1) - 1) > 0, levels -(2^(bits-1)-1)..2^(bits-1)-1: what
              TensorRT takes (positive scales, zero points zero; onnx-tensorrt's Q/DQ importer).
  asymmetric  d = (max - min) / (2^bits - 1) and a zero point z per block (zero exact):
              (q - z) * d. ONNX Runtime's MatMulNBits and QMoE take the zero points as an input.

Every scheme rounds d to an fp16 value first (absmax to the nearest; symmetric and asymmetric
up, so the block's range still fits the levels; a d below fp16's normal range keeps its float32
value) and then computes q with it,
as llama.cpp stores fp16 block scales. The bundle stores the scales as float32 (MatMulNBits
rejects fp16 ones with fp32 activations), but the native decoder holds them at 2 bytes
(runtime/native/dsx.h: int4 block 32 reads 0.5625 bytes/weight, not 0.625).

The first two are ONNX Runtime's MatMulNBits/QMoE convention with the default zero point, so the
graph computes with exactly the weights `dequantize_rows` returns. `per_channel_bits` widths use
one block per row (K): TensorRT's INT8 weights are per channel (its block quantization is INT4).

Which parts are quantized (QuantSpec.bits): attention projections, shared experts, routed
experts, dense MLPs, the output head; the router (and the correction bias), norms and the
embedding table stay fp32. The absorbed W_UK/W_UV (3-D batched MatMuls) stay unquantized, but a
quantized bundle rounds them to fp16 values (QuantSpec.absorbed "fp16", recorded in the
manifest; "fp32" for manifests that predate it), which the native decoder holds at 2 bytes.

Activations. Some kernels round their inputs to int8 per block (symmetric, scale absmax / 127,
x * (127 / absmax) rounded half to even: MLAS on every ISA): MatMulNBits at accuracy_level 4,
QMoE's 4-bit path at accuracy_level 4, and QMoE's 8-bit path always. Whether a bundle's kernels
do is answered here once (`projection_activation_block`, `expert_activation_block`,
`rounds_activations`) for every reader: the export, the reference's emulation, the paged
store's numpy experts, the golden tolerance and `validate`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsexport.core.config import ModelConfig
from .errors import UserError

PARTS = ("attention", "shared_experts", "routed_experts", "dense_mlp", "lm_head")
BLOCK_SIZES = (32, 64, 128)
SCHEMES = ("absmax", "symmetric", "asymmetric")
LOWERINGS = ("ort", "qdq")  # MatMulNBits/QMoE (CPU targets); DequantizeLinear + standard ops (TensorRT)
ACTIVATIONS = ("int8", "fp32")
QUANT_METHODS = ("rtn", "awq")
ABSORBED = ("fp16", "fp32")  # QuantSpec.absorbed
METHOD_NAMES = {"rtn": "round-to-nearest", "awq": "awq"}  # as the manifest spells them
AWQ_FILE = "awq_scales.safetensors"  # the scales an awq bundle was rescaled by (exporter/awq.py)
PRESETS = {
    "fp32": {},
    "int8": {p: 8 for p in PARTS},
    # the output head at 8 bits, as llama.cpp's q4_0 keeps its output tensor at higher precision
    "int4": {"attention": 4, "shared_experts": 4, "routed_experts": 4, "dense_mlp": 4, "lm_head": 8},
}
SCALE_BYTES = 4  # the quantizer writes float32 scales (MatMulNBits rejects fp16 ones with fp32 activations),
# whose values are fp16 values where they fit (`quantize_rows`): the native decoder holds those at 2 bytes
# ONNX Runtime 1.32 repacks MatMulNBits/QMoE weights at load for its int8-activation kernels, adding
# a float32 block sum per block beside the float32 scale (measured with
# session.save_external_prepacked_constant_initializers: 4-bit block 32 = 0.750 bytes/weight).
ORT_BLOCK_SUM_BYTES = 4


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: dict[str, int] = dataclasses.field(default_factory=dict)  # part -> 4 | 8; absent: fp32
    block_size: int = 32
    # Routed experts' block, when it must differ: ONNX Runtime's QMoE takes no padding, so its
    # block must divide hidden_size and moe_intermediate_size (`for_model` picks it).
    expert_block_size: int | None = None
    # "int8": the quantized projections round their inputs to int8 per block (accuracy_level 4:
    # ONNX Runtime's fast kernels, as llama.cpp quantizes its activations to q8); "fp32" keeps
    # them (exact, but ONNX Runtime 1.32's 8-bit path then dequantizes every call, ~50x slower).
    activations: str = "int8"
    # Per-expert widths overriding routed_experts: {layer: {original expert id: 4 | 8}}
    expert_bits: dict[int, dict[int, int]] = dataclasses.field(default_factory=dict)
    scheme: str = "absmax"  # see the module docstring
    per_channel_bits: tuple[int, ...] = ()  # widths quantized with one scale per output row
    lowering: str = "ort"  # "ort": MatMulNBits / QMoE; "qdq": DequantizeLinear on constant weights
    # "rtn": round to nearest; "awq": MoE layers rescaled first (activation-aware scaling, an exact
    # rewrite of the model whose scales the bundle stores: exporter/awq.py), then rounded
    method: str = "rtn"
    # The absorbed W_UK/W_UV (kv_b_proj), which stay unquantized: "fp16" rounds them to fp16
    # values (the native decoder then holds them at 2 bytes, exactly), "fp32" keeps them (bundles
    # whose manifest predates the field)
    absorbed: str = "fp16"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise UserError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.activations not in ACTIVATIONS:
            raise UserError(f"activations must be int8 or fp32, got {self.activations!r}")
        if self.method not in QUANT_METHODS:
            raise UserError(f"--quant-method must be one of {', '.join(QUANT_METHODS)}, got {self.method!r}")
        if self.lowering not in LOWERINGS:
            raise UserError(f"quantization lowering must be one of {', '.join(LOWERINGS)}, got {self.lowering!r}")
        if self.absorbed not in ABSORBED:
            raise UserError(f"absorbed W_UK/W_UV must be one of {', '.join(ABSORBED)}, got {self.absorbed!r}")
        if self.expert_block_size is not None and self.expert_block_size not in BLOCK_SIZES:
            raise UserError(f"expert block size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                            f"got {self.expert_block_size}")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        for part, b in self.bits.items():
            if part not in PARTS or b not in part_widths(part):
                raise UserError(f"quantization: {part}={b}; parts are {', '.join(PARTS)}, bits 4 or 8 "
                                "(or 6, except routed_experts)")
        for layer, widths in self.expert_bits.items():
            if any(b not in (4, 8) for b in widths.values()):
                raise UserError(f"quantization: layer {layer}'s expert widths must be 4 or 8")

    @classmethod
    def preset(cls, precision: str, block_size: int = 32, overrides: dict[str, int | None] | None = None,
               activations: str = "int8") -> "QuantSpec":
        if precision not in PRESETS:
            raise UserError(f"precision {precision!r}: quantized presets are {', '.join(PRESETS)}")
        bits = dict(PRESETS[precision])
        for part, b in (overrides or {}).items():
            if b is None:
                bits.pop(part, None)
            else:
                bits[part] = b
        return cls(bits, block_size, activations=activations)

    # ---- what is quantized, and how -------------------------------------------------------
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

    def for_model(self, hidden: int, moe_intermediate: int) -> "QuantSpec":
        """This spec with the routed experts' block set to the largest of the requested one
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

    # ---- activations: the one answer ------------------------------------------------------
    def projection_activation_block(self, part: str) -> int | None:
        """The block a quantized projection (MatMulNBits) of `part` rounds its input in, or None."""
        if self.lowering == "qdq" or self.bits.get(part) is None or self.activations != "int8":
            return None
        return self.block_size

    @property
    def projection_accuracy_level(self) -> int:
        """MatMulNBits accuracy_level: 4 rounds activations to int8, 0 keeps them fp32."""
        return 4 if self.lowering == "ort" and self.activations == "int8" else 0

    def expert_activation_block(self, bits: int | None) -> int | None:
        """The block a routed expert of this width rounds its input and SwiGLU output in (QMoE:
        its 8-bit path always, its 4-bit path at accuracy_level 4), or None."""
        if self.lowering == "qdq" or bits is None:
            return None
        if bits == 8 or self.activations == "int8":
            return self.block_for("routed_experts")
        return None

    def expert_widths(self) -> set[int]:
        widths = {b for m in self.expert_bits.values() for b in m.values()}
        if self.bits.get("routed_experts"):
            widths.add(self.bits["routed_experts"])
        return widths

    @property
    def rounds_activations(self) -> bool:
        """Whether any kernel of the bundle rounds activations to int8: then two correct
        implementations may differ where a value lies on a rounding boundary."""
        if self.lowering == "qdq" or not self.active:
            return False
        if self.activations == "int8":
            return True
        return any(self.expert_activation_block(b) for b in self.expert_widths())

    # ---- manifest --------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"bits": dict(self.bits), "block_size": self.block_size,
                "expert_block_size": self.block_for("routed_experts"), "symmetric": self.scheme != "asymmetric",
                "scheme": self.scheme, "per_channel_bits": list(self.per_channel_bits), "lowering": self.lowering,
                "scale_dtype": "float32", "method": METHOD_NAMES[self.method], "activations": self.activations,
                **({"absorbed": self.absorbed} if self.absorbed != "fp32" else {}),  # absent: fp32 (earlier manifests)
                "expert_bits": {str(layer): {str(e): b for e, b in sorted(m.items())}
                                for layer, m in sorted(self.expert_bits.items())}}

    @classmethod
    def from_json(cls, data: dict) -> "QuantSpec":
        """An already validated quantization section (core/manifest.py checks types and ranges)."""
        return cls(dict(data["bits"]), data["block_size"], data.get("expert_block_size"), data.get("activations", "fp32"),
                   {int(layer): {int(e): b for e, b in m.items()} for layer, m in data.get("expert_bits", {}).items()},
                   data.get("scheme", "absmax"), tuple(data.get("per_channel_bits", ())), data.get("lowering", "ort"),
                   {v: k for k, v in METHOD_NAMES.items()}.get(data.get("method"), "rtn"), data.get("absorbed", "fp32"))


def part_widths(part: str) -> tuple[int, ...]:
    """The widths a part may take. 6 bits is a 6-bit quantization (levels -32..31 x the block
    scale) stored in MatMulNBits' 8-bit form, so ONNX Runtime runs it as int8 and the native
    decoder reads it at 0.75 bytes a weight; the fused MoE ops (QMoE) take only 4 and 8."""
    return (4, 8) if part == "routed_experts" else (4, 6, 8)


def storage_bits(bits: int) -> int:
    """The bits a weight of this width is stored in (the graph's MatMulNBits or Q/DQ form)."""
    return 8 if bits == 6 else bits


def weight_layout(bits: int, block: int, K: int, per_channel_bits: tuple[int, ...], qdq: bool) -> tuple[int, int]:
    """QuantSpec.layout_for with its fields spelled out (the MoE lowerings hold them loose)."""
    if bits in per_channel_bits:
        return bits, K
    if qdq and K % block:
        return 8, K
    return bits, block


# ---- bytes ---------------------------------------------------------------------------------
def part_bytes(spec: QuantSpec | None, part: str, rows: int, K: int, resident: bool = False) -> float:
    """Bytes of `rows` weights of K inputs of a part as the quantizer writes them (resident: as
    ONNX Runtime holds them after repacking, block sums included)."""
    n = rows * K
    bits = spec.bits.get(part) if spec is not None else None
    if bits is None:
        return 4.0 * n
    bits, block = spec.layout_for(part, bits, K)
    blocks = rows * -(-K // block)
    padded = blocks * block  # K padded to the block
    zero = spec.scheme == "asymmetric"
    extra = ORT_BLOCK_SUM_BYTES if resident and spec.lowering == "ort" and spec.activations == "int8" else 0
    bits = storage_bits(bits)
    return padded * bits / 8 + blocks * (SCALE_BYTES + extra + (bits / 8 if zero else 0))


def weight_bytes(cfg: ModelConfig, spec: QuantSpec | None = None, resident: bool = False) -> tuple[int, int]:
    """(bytes of all weights, bytes a decoded token reads) of the bundle `spec` describes:
    quantized parts at their bits, blocks and scales, everything else fp32 (embeddings, router,
    norms, the absorbed kv_b_proj). Per-expert widths and pruned layers are counted as built."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def size(part: str, rows: int, K: int) -> float:
        return part_bytes(spec, part, rows, K, resident)

    q_out = H * (dn + dr)
    q = size("attention", q_out + r + dr, D) if cfg.q_lora_rank is None else (
        size("attention", cfg.q_lora_rank + r + dr, D) + size("attention", q_out, cfg.q_lora_rank))
    attention = q + size("attention", D, H * dv) + 4.0 * (r * H * (dn + dv) + 2 * D + r + (cfg.q_lora_rank or 0))
    bits = spec.bits if spec is not None else {}
    tied_fp32 = cfg.tie_word_embeddings and "lm_head" not in bits
    head = 4.0 * V * D if tied_fp32 else size("lm_head", V, D)
    total = 4.0 * V * D + (0 if tied_fp32 else head) + 4 * D
    active = head + 4 * D
    I, Im = cfg.intermediate_size, cfg.moe_intermediate_size
    for layer in range(cfg.num_hidden_layers):
        total += attention
        active += attention
        if not cfg.is_moe_layer(layer):
            dense = size("dense_mlp", 2 * I, D) + size("dense_mlp", D, I)
            total += dense
            active += dense
            continue
        E = cfg.num_experts(layer)
        shared = 0.0
        if cfg.n_shared_experts:
            Is = Im * cfg.n_shared_experts
            shared = size("shared_experts", 2 * Is, D) + size("shared_experts", D, Is)
        shared += 4.0 * (E * D + (E if cfg.uses_correction_bias else 0))
        experts = [expert_bytes(cfg, spec, layer, e, resident) for e in cfg.expert_ids(layer)]
        total += shared + sum(experts)
        active += shared + cfg.num_experts_per_tok * (sum(experts) / max(len(experts), 1))
    return int(total), int(active)


def expert_bytes(cfg: ModelConfig, spec: QuantSpec | None, layer: int, expert_id: int, resident: bool = False) -> float:
    """One routed expert's gate/up [2I, D] and down [D, I] at its width."""
    D, Im = cfg.hidden_size, cfg.moe_intermediate_size
    if spec is not None and spec.expert_bits.get(layer):
        spec = dataclasses.replace(spec, bits={**spec.bits, "routed_experts": spec.bits_for_expert(layer, expert_id)}
                                   if spec.bits_for_expert(layer, expert_id) else
                                   {k: v for k, v in spec.bits.items() if k != "routed_experts"}, expert_bits={})
    return part_bytes(spec, "routed_experts", 2 * Im, D, resident) + part_bytes(spec, "routed_experts", D, Im, resident)


# ---- arithmetic ------------------------------------------------------------------------------
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
        d = fp16_valued(np.take_along_axis(blocks, idx, -1)[..., 0] / -half)
    elif scheme == "symmetric":
        d = fp16_valued(np.abs(blocks).max(-1) / (half - 1), up=True)
    else:  # asymmetric: the range always holds 0, so a zero weight stays exactly zero
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        d = fp16_valued((hi - lo) / top, up=True)
        safe = np.where(d == 0, np.float32(1), d)
        zero = np.clip(np.rint(-lo / safe), 0, top).astype(np.uint8)
    safe = np.where(d == 0, np.float32(1), d)
    offset = zero[..., None].astype(np.float32) if zero is not None else half
    q = np.clip(np.rint(blocks / safe[..., None]) + offset, 0, top).astype(np.uint8)
    return q.reshape(w.shape), d, zero


def fp16_valued(d: np.ndarray, up: bool = False) -> np.ndarray:
    """Block scales rounded to the nearest fp16 value (up: the next one away from zero, so a
    range that must fit the levels still does), as float32, where that is a normal fp16 (|d| in
    [2^-14, 65504]) or zero; others keep their float32 value (an fp16 subnormal would lose
    precision). q is computed with the rounded d: absmax's extreme weight may then sit a fraction
    of a level past the last one (clamped) instead of exactly on it."""
    d = np.asarray(d, np.float32)
    with np.errstate(over="ignore"):
        half = d.astype(np.float16)
        if up:  # d >= 0 here (symmetric, asymmetric)
            half = np.where(half.astype(np.float32) < d, np.nextafter(half, np.float16(np.inf)), half)
        rounded = half.astype(np.float32)
    normal = (np.abs(d) >= np.float32(2.0 ** -14)) & np.isfinite(rounded)
    return np.where(normal | (d == 0), rounded, d).astype(np.float32)


def absorbed_values(w: np.ndarray) -> np.ndarray:
    """The absorbed W_UK/W_UV (kv_b_proj) of a quantized bundle whose spec says absorbed="fp16":
    each weight rounded to the nearest fp16 value, as float32 (a weight past fp16's range keeps
    its value). The graph stores these float32 values, so it computes exactly with them."""
    w = np.asarray(w, np.float32)
    with np.errstate(over="ignore"):
        rounded = w.astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(rounded), rounded, w).astype(np.float32)


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


def quantize_activations(x: np.ndarray, block: int) -> np.ndarray:
    """What MLAS does to a kernel input it rounds to int8: per block of the last dim, symmetric,
    scale = absmax / 127, x * (127 / absmax) rounded half to even (MLAS computes the inverse
    scale as 127 / absmax on AVX2, AVX-512 and NEON alike). exporter/reference.py has the torch twin."""
    x = np.asarray(x, np.float32)
    shape = x.shape
    pad = -shape[-1] % block  # a last partial block is quantized on its own (zeros do not change its max)
    if pad:
        x = np.concatenate([x, np.zeros(shape[:-1] + (pad,), np.float32)], axis=-1)
    b = x.reshape(shape[:-1] + (x.shape[-1] // block, block))
    amax = np.abs(b).max(-1, keepdims=True)
    scale = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax == 0, np.float32(0), np.float32(127) / amax)
    return (np.rint(b * inverse) * scale).reshape(x.shape)[..., : shape[-1]]
