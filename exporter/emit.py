"""The decoder's blocks as ONNX, one method per block, shapes in comments.

`DecoderEmitter` writes into a GraphBuilder: inputs, rope tables and the mask, MLA attention on
the latent (W_UK absorbed into the query, W_UV into the output), dense MLPs, MoE layers (router
and shared experts, then the routed experts by the chosen lowering), and the output head. The
fused decoder (exporter/export.py), the paged bundle's segments (exporter/paged.py) and the MTP
graph (exporter/mtp_export.py) are all made of these methods; a MoE layer is split at its routed
experts (`layer_until_experts`, `moe_front`) so the paged segments end exactly where the fused
graph runs its experts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from dsexport.core.config import ModelConfig
from dsexport.core.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_name
from dsexport.core.quant import QuantSpec, absorbed_values

from .graph import GraphBuilder
from .lowering import ExpertWeights, LoweringOptions, get_lowering
from .qdq import linear_qdq
from .reference import LATENT_NORM_EPS
from .rope import rope_frequencies


@dataclasses.dataclass(frozen=True)
class MoEFront:
    """A MoE layer up to its routed experts."""
    x2: str  # the experts' input [N, D]
    logits: str  # router logits [N, E]
    shared: str | None  # the shared experts' output [N, D], or None
    weights: ExpertWeights


class DecoderEmitter:
    def __init__(self, g: GraphBuilder, cfg: ModelConfig, moe_lowering: str, prefill_moe_lowering: str | None = None,
                 moe_shards: int = 1, quant: QuantSpec | None = None):
        self.g, self.cfg = g, cfg
        self.lowering = get_lowering(moe_lowering)
        self.prefill_lowering = get_lowering(prefill_moe_lowering) if prefill_moe_lowering else None
        self.quant = quant or QuantSpec()
        q = self.quant
        self.lowering_options = LoweringOptions(
            moe_shards=moe_shards, expert_bits=q.bits.get("routed_experts"), block_size=q.block_for("routed_experts"),
            accuracy_level=q.projection_accuracy_level, scheme=q.scheme, qdq=q.lowering == "qdq",
            per_channel_bits=q.per_channel_bits)
        self.present: list[str] = []
        self.past: dict[int, str] = {}

    # ---- projections --------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, name: str, part: str, bias: np.ndarray | None = None,
               scale: float | np.ndarray = 1.0) -> str:
        """x @ W^T at the part's precision; `scale` is a constant folded into the weights."""
        bits = self.quant.bits.get(part)
        if bits is None:
            return self.g.linear(x, w * np.float32(scale) if np.any(np.asarray(scale) != 1.0) else w, name, bias)
        bits, block = self.quant.layout_for(part, bits, w.shape[1])
        if self.quant.lowering == "qdq":  # TensorRT: DequantizeLinear + MatMul
            return linear_qdq(self.g, x, w, name, bits, block, bias, scale)
        return self.g.linear_nbits(x, w, name, bits, block, bias, scale,
                                   accuracy_level=self.quant.projection_accuracy_level, scheme=self.quant.scheme)

    def linear_split(self, x: str, weights: list[np.ndarray], name: str, part: str,
                     biases: list | None = None, scales: list[float] | None = None) -> list[str]:
        """Projections of one input as one MatMul (or MatMulNBits), then Split."""
        scales = scales or [1.0] * len(weights)
        if self.quant.bits.get(part) is None:
            return self.g.linear_split(x, [w * np.float32(s) if s != 1.0 else w for w, s in zip(weights, scales)],
                                       name, biases)
        sizes = [w.shape[0] for w in weights]
        bias = None
        if biases and any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])
        row_scale = np.concatenate([np.full(n, s, np.float32) for n, s in zip(sizes, scales)])
        y = self.linear(x, np.concatenate(weights, axis=0), name, part, bias, row_scale)
        return self.g.op("Split", [y, self.g.const(sizes)], name=name + "_split", outputs=len(sizes), axis=-1)

    # ---- inputs, rope, mask -------------------------------------------------------------
    def token_inputs(self) -> None:
        g = self.g
        self.input_ids = g.input(INPUT_IDS, TensorProto.INT64, ["batch", "seq"])
        self.position_ids = g.input(POSITION_IDS, TensorProto.INT64, ["batch", "seq"])
        self.attention_mask = g.input(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"])

    def cache_inputs(self, layers) -> None:
        self.past = {i: self.g.input(past_name(i), TensorProto.FLOAT, ["batch", "past_seq", self.cfg.latent_dim])
                     for i in layers}

    def rope_and_mask(self, shape_of: str) -> None:
        """Rope tables for position_ids and the causal + padding mask; shape_of: a [B, T, ..] value
        giving the new token count (input_ids, or a segment's hidden input)."""
        g, cfg = self.g, self.cfg
        inv_freq, rope_scale = rope_frequencies(cfg)
        pos = g.op("Cast", [g.op("Unsqueeze", [self.position_ids, g.const([-1])], name="pos3")], name="posf", to=1)
        freqs = g.op("Mul", [pos, g.weight("rope.inv_freq", inv_freq.numpy())], name="freqs")  # [B, T, dr/2]
        cos, sin = g.op("Cos", [freqs], name="cos"), g.op("Sin", [freqs], name="sin")
        if rope_scale != 1.0:
            cos = g.op("Mul", [cos, g.const(rope_scale, np.float32)], name="cos_scaled")
            sin = g.op("Mul", [sin, g.const(rope_scale, np.float32)], name="sin_scaled")
        # Rotate-half rope as x * [cos, cos] + swap_halves(x) * [-sin, sin]: the tables are built
        # once here, so each rope costs a Gather and three elementwise ops.
        self.cos3 = g.op("Concat", [cos, cos], name="cos_full", axis=-1)  # [B, T, dr]
        self.sin3 = g.op("Concat", [g.op("Neg", [sin], name="neg_sin"), sin], name="sin_signed", axis=-1)
        self.cos4 = g.op("Unsqueeze", [self.cos3, g.const([1])], name="cos4")  # [B, 1, T, dr] for per-head queries
        self.sin4 = g.op("Unsqueeze", [self.sin3, g.const([1])], name="sin4")

        first_past = self.past[min(self.past)]  # every layer's cache has the same length
        past_len = g.op("Shape", [first_past], name="past_len", start=1, end=2)  # [1]
        new_len = g.op("Shape", [shape_of], name="new_len", start=1, end=2)  # [1]
        # a prompt (more than one new token) takes the prefill MoE lowering, if there is one
        self.is_prompt = g.op("Squeeze", [g.op("Greater", [new_len, g.const([1])], name="prompt_1d"), g.const([0])],
                              name="is_prompt")  # [] bool
        total = g.op("Add", [past_len, new_len], name="total_len")
        scalar = lambda v, n: g.op("Squeeze", [v, g.const([0])], name=n)  # noqa: E731
        k_pos = g.op("Range", [g.const(0), scalar(total, "total_s"), g.const(1)], name="k_pos")  # [S]
        q_pos = g.op("Range", [scalar(past_len, "past_s"), scalar(total, "total_s"), g.const(1)], name="q_pos")  # [T]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0])], name="k_pos2"),
                                      g.op("Unsqueeze", [q_pos, g.const([1])], name="q_pos2")], name="causal")  # [T, S]
        pad = g.op("Cast", [self.attention_mask], name="pad", to=TensorProto.BOOL)
        pad = g.op("Unsqueeze", [pad, g.const([1, 2])], name="pad4")  # [B, 1, 1, S]
        self.mask = g.op("And", [causal, pad], name="mask")  # [B, 1, T, S]

    def rope(self, x: str, cos: str, sin: str, name: str) -> str:
        g = self.g
        half = self.cfg.qk_rope_head_dim // 2
        swap = g.const(list(range(half, 2 * half)) + list(range(half)))
        swapped = g.op("Gather", [x, swap], name=name + "_swap", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], name=name + "_xc"), g.op("Mul", [swapped, sin], name=name + "_xs")],
                    name=name)

    # ---- attention ----------------------------------------------------------------------
    def _queries_and_latent(self, x: str, t: dict[str, np.ndarray], p: str) -> tuple[str, str]:
        """The query [B, T, H*(dn+dr)] (softmax scale folded in) and the kv_a output [B, T, r+dr]."""
        cfg, g = self.cfg, self.g
        w_kva, b_kva = t["self_attn.kv_a_proj_with_mqa.weight"], t.get("self_attn.kv_a_proj_with_mqa.bias")
        # The projections that read x (query or its LoRA down-projection, and kv_a) as one MatMul.
        if cfg.q_lora_rank is None:
            return tuple(self.linear_split(x, [t["self_attn.q_proj.weight"], w_kva], p + ".q_kv_a", "attention",
                                           [None, b_kva], [cfg.softmax_scale, 1.0]))
        qa, kv = self.linear_split(x, [t["self_attn.q_a_proj.weight"], w_kva], p + ".q_a_kv_a", "attention",
                                   [t.get("self_attn.q_a_proj.bias"), b_kva])
        qa = g.rms_norm(qa, t["self_attn.q_a_layernorm.weight"], LATENT_NORM_EPS, p + ".q_a_layernorm")
        return self.linear(qa, t["self_attn.q_b_proj.weight"], p + ".q_b_proj", "attention", scale=cfg.softmax_scale), kv

    def attention(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        g, cfg = self.g, self.cfg
        H, dn, dr, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        p = f"layers.{i}.self_attn"
        q, kv = self._queries_and_latent(x, t, p)
        w_kv_b = t["self_attn.kv_b_proj.weight"]
        if self.quant.active and self.quant.absorbed == "fp16":  # as the reference's (exporter/quantize.py)
            w_kv_b = absorbed_values(w_kv_b)
        w_kv_b = w_kv_b.reshape(H, dn + dv, r)
        w_uk = np.ascontiguousarray(w_kv_b[:, :dn])  # [H, dn, r]
        w_uv_t = np.ascontiguousarray(w_kv_b[:, dn:].transpose(0, 2, 1))  # [H, r, dv]

        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, H, dn + dr])], name=p + "_q4d")],
                 name=p + "_q_heads", perm=[0, 2, 1, 3])  # [B, H, T, dn+dr]
        q_nope, q_rope = g.op("Split", [q, g.const([dn, dr])], name=p + "_q_split", outputs=2, axis=-1)
        q_lat = g.op("MatMul", [q_nope, g.weight(p + ".w_uk", w_uk)], name=p + "_q_lat")  # [B, H, T, r]
        q_rope = self.rope(q_rope, self.cos4, self.sin4, p + "_q_rot")
        q = g.op("Concat", [q_lat, q_rope], name=p + "_q", axis=-1)  # [B, H, T, r+dr]

        c, k_rope = g.op("Split", [kv, g.const([r, dr])], name=p + "_kv_split", outputs=2, axis=-1)
        c = g.rms_norm(c, t["self_attn.kv_a_layernorm.weight"], LATENT_NORM_EPS, p + ".kv_a_layernorm")
        k_rope = self.rope(k_rope, self.cos3, self.sin3, p + "_k_rot")
        latent = g.op("Concat", [c, k_rope], name=p + "_latent", axis=-1)  # [B, T, r+dr]
        present = g.op("Concat", [self.past[i], latent], name=f"present_latent_{i}", axis=1)  # [B, S, r+dr]
        self.present.append(present)

        keys = g.op("Unsqueeze", [present, g.const([1])], name=p + "_keys")  # [B, 1, S, r+dr]
        scores = g.op("MatMul", [q, g.op("Transpose", [keys], name=p + "_keys_t", perm=[0, 1, 3, 2])],
                      name=p + "_scores")  # [B, H, T, S]
        scores = g.op("Where", [self.mask, scores, g.const(np.finfo(np.float32).min, np.float32)], name=p + "_masked")
        probs = g.op("Softmax", [scores], name=p + "_probs", axis=-1)
        values = g.op("Slice", [keys, g.const([0]), g.const([r]), g.const([-1])], name=p + "_values")  # [B, 1, S, r]
        ctx = g.op("MatMul", [probs, values], name=p + "_ctx_lat")  # [B, H, T, r]
        ctx = g.op("MatMul", [ctx, g.weight(p + ".w_uv_t", w_uv_t)], name=p + "_ctx")  # [B, H, T, dv]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], name=p + "_ctx_t", perm=[0, 2, 1, 3]), g.const([0, 0, H * dv])],
                   name=p + "_ctx_flat")  # [B, T, H*dv]
        return self.linear(ctx, t["self_attn.o_proj.weight"], p + ".o_proj", "attention", t.get("self_attn.o_proj.bias"))

    # ---- feed-forward -------------------------------------------------------------------
    def swiglu(self, a: str, b: str, name: str) -> str:
        g = self.g
        return g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a], name=name + "_sig")], name=name + "_silu"), b],
                    name=name + "_act")

    def mlp(self, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str, part: str) -> str:
        a, b = self.linear_split(x, [gate, up], name + ".gate_up", part)  # [.., I] each
        return self.linear(self.swiglu(a, b, name), down, name + ".down_proj", part)

    def moe_front(self, h: str, t: dict[str, np.ndarray], i: int) -> MoEFront:
        """Router logits and shared experts of MoE layer i, on its post-attention-norm input h."""
        g, cfg = self.g, self.cfg
        p = f"layers.{i}.mlp"
        x2 = g.op("Reshape", [h, g.const([-1, cfg.hidden_size])], name=p + "_x2d")  # [N, D]
        w = ExpertWeights(t["mlp.router"], t.get("mlp.bias"), t["mlp.w_gate"], t["mlp.w_up"], t["mlp.w_down"],
                          cfg.expert_groups(i))
        if not cfg.n_shared_experts:
            return MoEFront(x2, g.linear(x2, w.router, p + ".router"), None, w)  # [N, E]
        gate, up, down = (t[f"mlp.shared.{n}_proj.weight"] for n in ("gate", "up", "down"))
        if self.quant.bits.get("shared_experts") is None:  # router and shared expert read the same input: one MatMul
            logits, a, b = g.linear_split(x2, [w.router, gate, up], p + ".router_shared")  # [N, E], [N, Is], [N, Is]
        else:  # the router stays fp32
            logits = g.linear(x2, w.router, p + ".router")
            a, b = self.linear_split(x2, [gate, up], p + ".shared.gate_up", "shared_experts")
        shared = self.linear(self.swiglu(a, b, p), down, p + ".shared.down_proj", "shared_experts")  # [N, D]
        return MoEFront(x2, logits, shared, w)

    def routed(self, front: MoEFront, i: int) -> str:
        """The routed experts' output [N, D]; with a prefill lowering, an If picks it for prompts."""
        opts, p = self.lowering_options, f"layers.{i}.mlp"
        if self.quant.expert_bits.get(i):
            opts = dataclasses.replace(opts, slot_bits=tuple(self.quant.bits_for_expert(i, e)
                                                             for e in self.cfg.expert_ids(i)))
        emit = lambda lowering: lambda: lowering.emit(  # noqa: E731
            self.g, front.x2, front.logits, front.weights, self.cfg, p, opts)
        if self.prefill_lowering is None:
            return emit(self.lowering)()
        return self.g.branch(self.is_prompt, emit(self.prefill_lowering), emit(self.lowering), p + "_routed_if",
                             TensorProto.FLOAT, ["tokens", self.cfg.hidden_size])

    # ---- layers -------------------------------------------------------------------------
    def layer_until_experts(self, x: str, t: dict[str, np.ndarray], i: int) -> tuple[str, MoEFront]:
        """MoE layer i up to its routed experts: (the residual stream after attention, the front)."""
        g, cfg = self.g, self.cfg
        h = g.rms_norm(x, t["input_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.input_layernorm")
        x = g.op("Add", [x, self.attention(h, t, i)], name=f"layers.{i}_attn_res")
        h = g.rms_norm(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.post_attention_layernorm")
        return x, self.moe_front(h, t, i)

    def layer(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        g, cfg = self.g, self.cfg
        if cfg.is_moe_layer(i):
            x, front = self.layer_until_experts(x, t, i)
            y = self.routed(front, i)  # [N, D]
            if front.shared is not None:
                y = g.op("Add", [y, front.shared], name=f"layers.{i}.mlp_sum")
            m = g.op("Reshape", [y, g.op("Shape", [x], name=f"layers.{i}.mlp_shape")], name=f"layers.{i}.mlp_out")
            return g.op("Add", [x, m], name=f"layers.{i}_out")
        h = g.rms_norm(x, t["input_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.input_layernorm")
        x = g.op("Add", [x, self.attention(h, t, i)], name=f"layers.{i}_attn_res")
        h = g.rms_norm(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.post_attention_layernorm")
        m = self.mlp(h, t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"],
                     f"layers.{i}.mlp", "dense_mlp")
        return g.op("Add", [x, m], name=f"layers.{i}_out")

    # ---- output head --------------------------------------------------------------------
    def head(self, x: str, norm: np.ndarray, head: np.ndarray | None, embed_name: str | None, norm_name: str,
             shape_of: str) -> str:
        """Final norm, output head and the logits output [B, T, V]; returns the normed state.
        head None: tied to the embedding `embed_name` (read as stored by Gemm transB=1: one copy);
        a quantized head is always its own (smaller) copy."""
        g, cfg = self.g, self.cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        x = g.rms_norm(x, norm, cfg.rms_norm_eps, norm_name)
        x2 = g.op("Reshape", [x, g.const([-1, D])], name=norm_name + "_2d")
        if head is None:
            logits = g.op("Gemm", [x2, embed_name], name="lm_head", transB=1)  # [N, V]
        else:
            logits = self.linear(x2, head, "lm_head", "lm_head")  # [N, V]
        shape = g.op("Concat", [g.op("Shape", [shape_of], name="bt", start=0, end=2), g.const([V])], name="logits_shape",
                     axis=0)
        g.output(g.op("Reshape", [logits, shape], name="logits3"), LOGITS, TensorProto.FLOAT, ["batch", "seq", V])
        return x

    def tied_head_ok(self, tied: bool) -> bool:
        """Whether the head can read the fp32 embedding table in place."""
        return tied and self.quant.bits.get("lm_head") is None
