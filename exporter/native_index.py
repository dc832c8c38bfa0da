"""The native decoder's index into a paged bundle's own bytes (docs/native.md).

The runtime's native decoder (runtime/native/decoder.c) runs a whole step in C on the weights the
segment graphs already hold: MatMulNBits rows, fp32 MatMul weights, norms, W_UK/W_UV, the embedding,
and the routed experts of experts.bin. Nothing is written twice: this module only records where
each of those initializers lies in the segments' external-data files (GraphBuilder.locations),
role by role, in the manifest's `native` section. A bundle whose graphs the decoder cannot
reproduce exactly (`unsupported` says why) gets no section, and the runtime then runs the
segments (`run --stats` says so; `inspect` shows native_decoder false).
"""

from __future__ import annotations

import numpy as np

from dsexport.core.config import ModelConfig
from dsexport.core.quant import QuantSpec
from dsexport.core.sections import NATIVE_BLOCKS, NativeLayer, NativeLinear, NativeSection, TensorRef

from .graph import GraphBuilder
from .reference import LATENT_NORM_EPS
from .rope import rope_frequencies

NATIVE_VERSION = 1


def unsupported(cfg: ModelConfig, quant: QuantSpec | None) -> str | None:
    """Why the native decoder cannot run this bundle's graphs exactly, or None."""
    if quant is None or not quant.active:
        return None
    if quant.lowering != "ort":
        return f"{quant.lowering} lowering (the native decoder reads MatMulNBits weights)"
    if quant.scheme != "absmax":
        return f"the {quant.scheme} scheme (zero points); the native decoder reads symmetric weights"
    if quant.per_channel_bits:
        return "per-channel widths"
    for part, bits in quant.bits.items():
        if bits is not None and quant.block_for(part) not in NATIVE_BLOCKS:
            return f"block {quant.block_for(part)} for {part} (the native decoder takes {', '.join(map(str, NATIVE_BLOCKS))})"
    return None


class NativeIndexer:
    """Collects tensor locations segment by segment (exporter/paged.py calls `add_segment`)."""

    def __init__(self, cfg: ModelConfig, quant: QuantSpec | None):
        self.cfg, self.quant = cfg, quant or QuantSpec()
        self.layers: dict[int, NativeLayer] = {}
        self.globals: dict[str, TensorRef | NativeLinear] = {}

    def _ref(self, g: GraphBuilder, data_file: str, name: str, dtype: str, shape: tuple[int, ...]) -> TensorRef:
        offset, size = g.locations[name]
        return TensorRef(data_file, offset, size, dtype, tuple(int(d) for d in shape))

    def _linear(self, g: GraphBuilder, data_file: str, name: str, part: str, rows: int, cols: int,
                col_start: int = 0, total_cols: int | None = None) -> NativeLinear:
        """The projection `name` as the graph computes it: rows x cols of the weight (fp32 stored
        transposed [cols, total] for MatMul, columns col_start..; or MatMulNBits rows)."""
        bias = self._ref(g, data_file, name + ".bias", "float32", (rows,)) if name + ".bias" in g.locations else None
        bits = self.quant.bits.get(part)
        if bits is None:
            weight = self._ref(g, data_file, name + ".weight", "float32", (cols, total_cols or rows))
            return NativeLinear(32, None, rows, cols, "fp32", weight, None, col_start, bias)
        bits, block = self.quant.layout_for(part, bits, cols)
        nb = -(-cols // block)
        q = self._ref(g, data_file, name + ".qweight", "uint8", (rows, nb, block * bits // 8))
        scales = self._ref(g, data_file, name + ".scales", "float32", (rows * nb,))
        acts = "int8" if self.quant.projection_accuracy_level == 4 else "fp32"
        return NativeLinear(bits, block, rows, cols, acts, q, scales, 0, bias)

    def add_segment(self, g: GraphBuilder, data_file: str, layers: list[int], first: bool, last: bool) -> None:
        cfg = self.cfg
        D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        f32 = lambda name, shape: self._ref(g, data_file, name, "float32", shape)  # noqa: E731
        if first:
            self.globals["embed"] = f32("embed_tokens.weight", (V, D))
        if layers and "inv_freq" not in self.globals:
            self.globals["inv_freq"] = f32("rope.inv_freq", (dr // 2,))
        for i in layers:
            p, a = f"layers.{i}", f"layers.{i}.self_attn"
            qdim = H * (dn + dr)
            roles: dict[str, TensorRef | NativeLinear] = {
                "attn_norm": f32(f"{p}.input_layernorm.weight", (D,)),
                "kv_norm": f32(f"{a}.kv_a_layernorm.weight", (r,)),
                "w_uk": f32(f"{a}.w_uk", (H, dn, r)), "w_uv": f32(f"{a}.w_uv_t", (H, r, dv)),
                "o_proj": self._linear(g, data_file, f"{a}.o_proj", "attention", D, H * dv),
                "mlp_norm": f32(f"{p}.post_attention_layernorm.weight", (D,)),
            }
            if cfg.q_lora_rank is None:
                roles["qkv"] = self._linear(g, data_file, f"{a}.q_kv_a", "attention", qdim + r + dr, D)
            else:
                qr = cfg.q_lora_rank
                roles["qkv"] = self._linear(g, data_file, f"{a}.q_a_kv_a", "attention", qr + r + dr, D)
                roles["q_a_norm"] = f32(f"{a}.q_a_layernorm.weight", (qr,))
                roles["q_b"] = self._linear(g, data_file, f"{a}.q_b_proj", "attention", qdim, qr)
            if not cfg.is_moe_layer(i):
                inter = cfg.intermediate_size
                roles["gate_up"] = self._linear(g, data_file, f"{p}.mlp.gate_up", "dense_mlp", 2 * inter, D)
                roles["down"] = self._linear(g, data_file, f"{p}.mlp.down_proj", "dense_mlp", D, inter)
            elif cfg.n_shared_experts:
                inter = cfg.moe_intermediate_size * cfg.n_shared_experts
                if self.quant.bits.get("shared_experts") is None:  # router | gate | up as one fp32 MatMul
                    E = cfg.num_experts(i)
                    roles["gate_up"] = self._linear(g, data_file, f"{p}.mlp.router_shared", "shared_experts", 2 * inter,
                                                    D, col_start=E, total_cols=E + 2 * inter)
                else:
                    roles["gate_up"] = self._linear(g, data_file, f"{p}.mlp.shared.gate_up", "shared_experts",
                                                    2 * inter, D)
                roles["down"] = self._linear(g, data_file, f"{p}.mlp.shared.down_proj", "shared_experts", D, inter)
            self.layers[i] = NativeLayer(roles)
        if last:
            self.globals["final_norm"] = f32("norm.weight", (D,))
            self.globals["head"] = self._linear(g, data_file, "lm_head", "lm_head", V, D)

    def section(self) -> NativeSection:
        _, rope_scale = rope_frequencies(self.cfg)
        return NativeSection(NATIVE_VERSION, float(np.float32(rope_scale)), LATENT_NORM_EPS, dict(self.globals),
                             dict(self.layers))
