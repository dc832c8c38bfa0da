"""Export a DeepSeek checkpoint to one ONNX decoder graph with a latent KV cache, layer by layer.

The graph contract (docs/graph-contract.md):
  inputs   input_ids [B, T] int64, position_ids [B, T] int64, attention_mask [B, P+T] int64,
           past_latent.{i} [B, P, kv_lora_rank + qk_rope_head_dim] float32 for each layer i
  outputs  logits [B, T, V] float32, present_latent.{i} [B, P+T, kv_lora_rank + qk_rope_head_dim]

Attention runs on the latent: W_UK (the key half of kv_b_proj) is absorbed into the query and
W_UV (the value half) into the output, so keys and values are never expanded per head and the
cache holds only the normalized latent and the rotated rope key.

Tensors are read from the checkpoint one layer at a time and written straight to the external
data file, so peak memory is one layer plus the embeddings, whatever the depth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .graph import OPSET, GraphBuilder
from .lowering import ExpertWeights, LoweringOptions, get_lowering
from .qdq import linear_qdq
from .quantize import QuantConfig
from .reference import LATENT_NORM_EPS, layer_tensors
from .rope import rope_frequencies

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    moe_lowering: str = "ort-moe"
    moe_shards: int = 1  # see lowering.LoweringOptions
    # Another MoE lowering for prompts (T > 1), chosen in the graph by an If on the token count;
    # for decode-only lowerings such as `gather` (TensorRT targets). None: one lowering for both.
    prefill_moe_lowering: str | None = None
    quant: QuantConfig = QuantConfig()  # block-wise int8/int4 weights per part (exporter/quantize.py)
    opset: int = OPSET  # QDQ_INT4_OPSET for TensorRT int4 weights (exporter/qdq.py)
    # Also output `hidden_states` (the final-normed state the MTP graph reads); only in bundles
    # that carry an MTP graph, so other bundles keep the original contract (docs/mtp.md).
    hidden_states: bool = False


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    config: ModelConfig
    export_config: ExportConfig
    weight_bytes: int


def graph_contract(cfg: ModelConfig, hidden_states: bool = False) -> dict:
    """Names, dtypes and shapes of the decoder graph's inputs and outputs (symbolic dims)."""
    L = cfg.latent_dim
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_seq"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}]
    for i in range(cfg.num_hidden_layers):
        inputs.append({"name": f"past_latent.{i}", "dtype": "float32", "shape": ["batch", "past_seq", L]})
        outputs.append({"name": f"present_latent.{i}", "dtype": "float32", "shape": ["batch", "total_seq", L]})
    if hidden_states:
        outputs.append({"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", cfg.hidden_size]})
    return {"inputs": inputs, "outputs": outputs, "cache": {
        "layout": "per layer [batch, seq, kv_lora_rank + qk_rope_head_dim]: RMS-normalized latent, then rotated rope key",
        "values_per_token_per_layer": L,
    }}


class _DecoderEmitter:
    """Emits the decoder into a GraphBuilder; one method per block, shapes in comments."""

    def __init__(self, g: GraphBuilder, cfg: ModelConfig, export_cfg: ExportConfig):
        self.g, self.cfg = g, cfg
        self.lowering = get_lowering(export_cfg.moe_lowering)
        self.prefill_lowering = get_lowering(export_cfg.prefill_moe_lowering) if export_cfg.prefill_moe_lowering else None
        self.quant = export_cfg.quant
        self.hidden_states_output = export_cfg.hidden_states
        self.lowering_options = LoweringOptions(moe_shards=export_cfg.moe_shards,
                                                expert_bits=self.quant.bits.get("routed_experts"),
                                                block_size=self.quant.block_for("routed_experts"),
                                                accuracy_level=4 if self.quant.activations == "int8" else 0,
                                                scheme=self.quant.scheme, qdq=self.quant.lowering == "qdq",
                                                per_channel_bits=self.quant.per_channel_bits)

    def linear(self, x: str, w: np.ndarray, name: str, part: str, bias: np.ndarray | None = None,
               scale: float = 1.0) -> str:
        """x @ W^T at the part's precision; `scale` is a constant folded into the weights."""
        bits = self.quant.bits.get(part)
        if bits is None:
            return self.g.linear(x, w * np.float32(scale) if scale != 1.0 else w, name, bias)
        bits, block = self.quant.layout_for(part, bits, w.shape[1])
        if self.quant.lowering == "qdq":  # TensorRT: DequantizeLinear + MatMul
            return linear_qdq(self.g, x, w, name, bits, block, bias, scale)
        return self.g.linear_nbits(x, w, name, bits, block, bias, scale,
                                   accuracy_level=4 if self.quant.activations == "int8" else 0,
                                   scheme=self.quant.scheme)

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

    def routed(self, x2: str, logits: str, w: ExpertWeights, p: str, layer: int) -> str:
        """The routed experts' output [N, D]; with a prefill lowering, an If picks it for prompts."""
        opts = self.lowering_options
        if self.quant.expert_bits.get(layer):
            opts = dataclasses.replace(opts, slot_bits=tuple(self.quant.bits_for_expert(layer, e)
                                                             for e in self.cfg.expert_ids(layer)))
        emit = lambda lowering: lambda: lowering.emit(self.g, x2, logits, w, self.cfg, p, opts)  # noqa: E731
        if self.prefill_lowering is None:
            return emit(self.lowering)()
        return self.g.branch(self.is_prompt, emit(self.prefill_lowering), emit(self.lowering), p + "_routed_if",
                             TensorProto.FLOAT, ["tokens", self.cfg.hidden_size])

    def inputs(self) -> None:
        g, cfg = self.g, self.cfg
        self.input_ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        self.position_ids = g.input("position_ids", TensorProto.INT64, ["batch", "seq"])
        self.attention_mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
        self.past = [
            g.input(f"past_latent.{i}", TensorProto.FLOAT, ["batch", "past_seq", cfg.latent_dim])
            for i in range(cfg.num_hidden_layers)
        ]

    def rope_and_mask(self) -> None:
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

        past_len = g.op("Shape", [self.past[0]], name="past_len", start=1, end=2)  # [1]
        new_len = g.op("Shape", [self.input_ids], name="new_len", start=1, end=2)  # [1]
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

    def attention(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        g, cfg = self.g, self.cfg
        H, dn, dr, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        p = f"layers.{i}.self_attn"
        # The projections that read x (query or its LoRA down-projection, and kv_a) as one MatMul.
        # softmax_scale is folded into the query weights: scores come out scaled.
        w_kva, b_kva = t["self_attn.kv_a_proj_with_mqa.weight"], t.get("self_attn.kv_a_proj_with_mqa.bias")
        if cfg.q_lora_rank is None:
            q, kv = self.linear_split(x, [t["self_attn.q_proj.weight"], w_kva], p + ".q_kv_a", "attention",
                                      [None, b_kva], [cfg.softmax_scale, 1.0])  # q: [H*(dn+dr), D]
        else:
            qa, kv = self.linear_split(x, [t["self_attn.q_a_proj.weight"], w_kva], p + ".q_a_kv_a", "attention",
                                       [t.get("self_attn.q_a_proj.bias"), b_kva])
            qa = g.rms_norm(qa, t["self_attn.q_a_layernorm.weight"], LATENT_NORM_EPS, p + ".q_a_layernorm")
            q = self.linear(qa, t["self_attn.q_b_proj.weight"], p + ".q_b_proj", "attention", scale=cfg.softmax_scale)
        w_kv_b = t["self_attn.kv_b_proj.weight"].reshape(H, dn + dv, r)
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

    def mlp(self, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str) -> str:
        g = self.g
        a, b = self.linear_split(x, [gate, up], name + ".gate_up", "dense_mlp")  # [.., I] each
        act = g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a], name=name + "_sig")], name=name + "_silu"), b], name=name + "_act")
        return self.linear(act, down, name + ".down_proj", "dense_mlp")

    def moe(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        g, cfg = self.g, self.cfg
        p = f"layers.{i}.mlp"
        x2 = g.op("Reshape", [x, g.const([-1, cfg.hidden_size])], name=p + "_x2d")  # [N, D]
        w = ExpertWeights(t["mlp.router"], t.get("mlp.bias"), t["mlp.w_gate"], t["mlp.w_up"], t["mlp.w_down"],
                          cfg.expert_groups(i))
        if not cfg.n_shared_experts:
            return g.op("Reshape", [self.routed(x2, g.linear(x2, w.router, p + ".router"), w, p, i),
                                    g.op("Shape", [x], name=p + "_shape")], name=p + "_out")
        gate, up, down = t["mlp.shared.gate_proj.weight"], t["mlp.shared.up_proj.weight"], t["mlp.shared.down_proj.weight"]
        if self.quant.bits.get("shared_experts") is None:  # router and shared expert read the same input: one MatMul
            logits, a, b = g.linear_split(x2, [w.router, gate, up], p + ".router_shared")  # [N, E], [N, Is], [N, Is]
        else:  # the router stays fp32
            logits = g.linear(x2, w.router, p + ".router")
            a, b = self.linear_split(x2, [gate, up], p + ".shared.gate_up", "shared_experts")
        y = self.routed(x2, logits, w, p, i)  # [N, D]
        act = g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a], name=p + "_sig")], name=p + "_silu"), b], name=p + "_act")
        y = g.op("Add", [y, self.linear(act, down, p + ".shared.down_proj", "shared_experts")], name=p + "_sum")
        return g.op("Reshape", [y, g.op("Shape", [x], name=p + "_shape")], name=p + "_out")

    def layer(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        g, cfg = self.g, self.cfg
        h = g.rms_norm(x, t["input_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.input_layernorm")
        x = g.op("Add", [x, self.attention(h, t, i)], name=f"layers.{i}_attn_res")
        h = g.rms_norm(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.post_attention_layernorm")
        if cfg.is_moe_layer(i):
            m = self.moe(h, t, i)
        else:
            m = self.mlp(h, t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"], f"layers.{i}.mlp")
        return g.op("Add", [x, m], name=f"layers.{i}_out")

    def run(self, reader: CheckpointReader, progress: Callable[[str, int, int], None]) -> None:
        g, cfg = self.g, self.cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.inputs()
        self.rope_and_mask()
        self.present: list[str] = []
        embed = reader.get("model.embed_tokens.weight", (V, D)).numpy()
        embed_name = g.weight("embed_tokens.weight", embed)
        x = g.op("Gather", [embed_name, self.input_ids], name="embed", axis=0)  # [B, T, D]
        del embed
        for i in range(cfg.num_hidden_layers):
            progress("export", i, cfg.num_hidden_layers)
            t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, i)}
            x = self.layer(x, t, i)
            del t  # this layer's weights are on disk now; keep memory at one layer
        progress("export", cfg.num_hidden_layers, cfg.num_hidden_layers)
        x = g.rms_norm(x, reader.get("model.norm.weight", (D,)).numpy(), cfg.rms_norm_eps, "norm")
        x2 = g.op("Reshape", [x, g.const([-1, D])], name="final_2d")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in reader
        if tied and self.quant.bits.get("lm_head") is None:
            # Gemm(transB=1) reads the [V, D] embedding as stored: tied weights stay one copy
            logits = g.op("Gemm", [x2, embed_name], name="lm_head", transB=1)  # [N, V]
        else:  # a quantized head is its own (smaller) copy even when tied to the fp32 embedding table
            logits = self.linear(x2, reader.lm_head().numpy(), "lm_head", "lm_head")  # [N, V]
        out_shape = g.op("Concat", [g.op("Shape", [self.input_ids], name="bt"), g.const([V])], name="logits_shape", axis=0)
        g.output(g.op("Reshape", [logits, out_shape], name="logits3"), "logits", TensorProto.FLOAT, ["batch", "seq", V])
        for i, present in enumerate(self.present):
            g.output(present, f"present_latent.{i}", TensorProto.FLOAT, ["batch", "total_seq", cfg.latent_dim])
        if self.hidden_states_output:  # the final-normed state [B, T, D], the MTP graph's input
            g.output(x, "hidden_states", TensorProto.FLOAT, ["batch", "seq", D])


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def export_model(checkpoint_dir: str | Path | CheckpointReader, out_dir: str | Path,
                 export_cfg: ExportConfig = ExportConfig(),
                 progress: Callable[[str, int, int], None] = _no_progress,
                 kept_experts: dict[int, list[int]] | None = None) -> ExportResult:
    """Write the decoder graph (model.onnx + model.onnx.data) into out_dir.

    kept_experts: {layer: original expert ids to keep}; other layers keep all their experts.
    The bundle around it (manifest, tokenizer, checksums) is dsexport.exporter.bundle's job.
    """
    reader = checkpoint_dir if isinstance(checkpoint_dir, CheckpointReader) else CheckpointReader(checkpoint_dir)
    reader.config = cfg = reader.config.with_kept_experts(kept_experts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = GraphBuilder(out / DATA_FILE, export_cfg.opset)
    _DecoderEmitter(g, cfg, export_cfg).run(reader, progress)
    g.save(out / GRAPH_FILE, "dsexport_decoder")
    return ExportResult(out, cfg, export_cfg, g.weight_bytes)
