"""The native decoder's index into a CPU bundle's own bytes (docs/native.md).

The runtime's native decoder (runtime/native/decoder.c) runs a whole step in C on the weights the
graphs already hold: MatMulNBits rows, fp32 MatMul weights, norms, W_UK/W_UV, the embedding, and
the routed experts (a paged bundle's experts.bin, or a fused bundle's MoE / QMoE initializers).
Nothing is written twice: this module only records where each of those initializers lies in the
graphs' external-data files (GraphBuilder.locations), role by role, in the manifest's `native`
section. A bundle whose graphs the decoder cannot
reproduce exactly (`unsupported` says why) gets no section, and the runtime then runs the
segments (`run --stats` says so; `inspect` shows native_decoder false).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsexport.core.config import ModelConfig
from dsexport.core.quant import QuantSpec, storage_bits
from dsexport.core.sections import (NATIVE_BLOCKS, NativeLayer, NativeLinear, NativeMTP, NativeRouted, NativeSection,
                                    TensorRef)

from .graph import GraphBuilder
from .lowering import moe_shard_count
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


def fused_unsupported(cfg: ModelConfig, quant: QuantSpec | None, moe_lowering: str) -> str | None:
    """Why the native decoder cannot run a fused bundle's graph exactly, or None."""
    why = unsupported(cfg, quant)
    if why is not None:
        return why
    if cfg.n_routed_experts and moe_lowering != "ort-moe":
        return f"the {moe_lowering} MoE lowering (the native decoder reads the fused MoE op's weights)"
    if quant is not None and quant.expert_bits:
        return "per-expert widths (one QMoE per width)"
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
        bits = storage_bits(bits)  # a 6-bit part is 8-bit rows here; the native backend packs it to 6
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
            if "lm_head.weight" in g.locations or "lm_head.qweight" in g.locations:
                self.globals["head"] = self._linear(g, data_file, "lm_head", "lm_head", V, D)
            else:  # the fused graph's head reads the embedding table in place (Gemm transB=1)
                self.globals["head"] = NativeLinear(32, None, V, D, "fp32", f32("embed_tokens.weight", (V, D)), None,
                                                    layout="rows")

    def add_routed(self, g: GraphBuilder, data_file: str, i: int, shards: int) -> None:
        """MoE layer i's routed experts and router as the fused graph holds them (lowering.emit_ort_moe)."""
        cfg, q = self.cfg, self.quant
        E, inter, D = cfg.num_experts(i), cfg.moe_intermediate_size, cfg.hidden_size
        bits, block = q.bits.get("routed_experts"), q.block_for("routed_experts")
        S = moe_shard_count(inter, shards, bits, block)
        p = f"layers.{i}.mlp"
        if f"{p}.router.weight" in g.locations:
            router = self._ref(g, data_file, f"{p}.router.weight", "float32", (D, E))
        else:  # router | shared gate | shared up as one MatMul [D, E + 2Is]: the router is columns 0..E
            total = g.locations[f"{p}.router_shared.weight"][1] // (4 * D)
            router = self._ref(g, data_file, f"{p}.router_shared.weight", "float32", (D, total))
        bias = self._ref(g, data_file, f"{p}.bias", "float32", (E,)) if f"{p}.bias" in g.locations else None
        groups = cfg.expert_groups(i)
        part, slots = inter // S, S * E
        fold = float(np.float32(cfg.routed_scaling_factor * S))
        if bits is None:
            fc1 = self._ref(g, data_file, f"{p}.fc1", "float32", (slots, 2 * part, D))
            fc2 = self._ref(g, data_file, f"{p}.fc2", "float32", (slots, D, part))
            routed = NativeRouted(32, None, "fp32", S, fold, fc1, fc2, None, None, router, 0, bias, groups)
        else:
            nb = -(-D // block)
            fc1 = self._ref(g, data_file, f"{p}.fc1q", "uint8", (slots, 2 * part, nb * block * bits // 8))
            fc2 = self._ref(g, data_file, f"{p}.fc2q", "uint8", (slots, D, part * bits // 8))
            s1 = self._ref(g, data_file, f"{p}.fc1s", "float32", (slots, 2 * part, nb))
            s2 = self._ref(g, data_file, f"{p}.fc2s", "float32", (slots, D, part // block))
            acts = "int8" if q.expert_activation_block(bits) is not None else "fp32"
            routed = NativeRouted(bits, block, acts, S, fold, fc1, fc2, s1, s2, router, 0, bias, groups)
        self.layers[i] = dataclasses.replace(self.layers[i], routed=routed)

    def section(self) -> NativeSection:
        _, rope_scale = rope_frequencies(self.cfg)
        return NativeSection(NATIVE_VERSION, float(np.float32(rope_scale)), LATENT_NORM_EPS, dict(self.globals),
                             dict(self.layers))


def mtp_block(g: GraphBuilder, data_file: str, cfg: ModelConfig, quant: QuantSpec | None, shards: int) -> NativeMTP | None:
    """The MTP graph's block (exporter/mtp_export.py) located for the native decoder, or None where
    the graph holds its own embedding, rope or head instead of the decoder's (the native block
    runs with the decoder's)."""
    if any(name in g.locations for name in ("embed_tokens.weight", "rope.inv_freq", "lm_head.weight",
                                            "lm_head.qweight")):
        return None
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    indexer = NativeIndexer(cfg, quant)
    indexer.globals["inv_freq"] = None  # the decoder's: not located again
    indexer.add_segment(g, data_file, [L], False, False)
    if cfg.is_moe_layer(L):
        indexer.add_routed(g, data_file, L, shards)
    f32 = lambda name: indexer._ref(g, data_file, name, "float32", (D,))  # noqa: E731
    eh_proj = indexer._linear(g, data_file, "mtp.eh_proj", "eh_proj", D, 2 * D)  # fp32 at every precision
    return NativeMTP(indexer.layers[L], f32("mtp.enorm.weight"), f32("mtp.hnorm.weight"), eh_proj,
                     f32("mtp.shared_head_norm.weight"))
