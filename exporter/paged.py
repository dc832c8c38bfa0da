"""Paged bundles: the decoder split at each MoE layer's routed experts, the experts in a store.

ONNX Runtime cannot call back into Python inside a graph, so a paged bundle cuts the decoder
into segments, one per MoE layer (docs/paging.md):

  segment j   inputs   input_ids (segment 0) or hidden [B, T, D] (the others), position_ids,
                       attention_mask, past_latent.{i} of its layers
              runs     the dense layers since the previous MoE layer, then MoE layer i's
                       attention, post-attention norm, router and shared experts
              outputs  moe_input.{i} [N, D] (what the routed experts read), router_ids.{i} [N, k]
                       (expert slots, routing exactly as exporter/lowering.emit_routing),
                       router_weights.{i} [N, k] (final_weights: normalized and scaled),
                       residual.{i} [B, T, D] (residual stream + shared experts), present_latent.{i}
  last        inputs   hidden (+ position_ids, attention_mask, past of trailing dense layers)
              outputs  logits [B, T, V]

The runtime adds sum_k weight * expert(moe_input) to residual and feeds it to the next segment
as `hidden` (runtime/paging.py). The routed experts live in experts.bin, one 4096-aligned record
per (layer, expert slot), at the bundle's routed-expert precision:

  fp32       w_gate_up float32 [2I, D] (gate rows then up rows), then w_down float32 [D, I]
  int8/int4  quantize.quantize_rows of both (the fused QMoE's weights, bit for bit): scales float32
             [2I, D/B] and [D, I/B], then q [2I, D*bits/8] and [D, I*bits/8] (int4 two per byte,
             even index in the low nibble: quantize.pack), then with zero points (asymmetric)
             uint8 [2I, D/B] and [D, I/B], one byte per block
Each layer's router [E, D] and correction bias [E] are stored there too, for the prefetcher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from dsexport.errors import UserError

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .export import ExportConfig, _DecoderEmitter
from .graph import GraphBuilder
from .lowering import ExpertWeights, emit_routing, final_weights
from .quantize import QuantConfig, pack, quantize_rows
from .reference import layer_tensors

STORE_FILE = "experts.bin"
STORE_ALIGN = 4096  # page-aligned records: one pread per expert, O_DIRECT-ready
PAGED_LOWERING = "paged"
PAGING_VERSION = 1


def segment_file(j: int) -> str:
    return f"segment_{j:02d}.onnx"


def segment_plan(cfg: ModelConfig) -> list[dict]:
    """[{layers, moe_layer}]: each segment ends at a MoE layer's routed experts; the last one
    (moe_layer None) holds any trailing dense layers, the final norm and the output head."""
    segments, layers = [], []
    for i in range(cfg.num_hidden_layers):
        layers.append(i)
        if cfg.is_moe_layer(i):
            segments.append({"layers": layers, "moe_layer": i})
            layers = []
    segments.append({"layers": layers, "moe_layer": None})
    return segments


class _StoreWriter:
    """Writes experts.bin one layer at a time and keeps its index. quant: the bundle's QuantConfig;
    routed experts at its bits (none: fp32)."""

    def __init__(self, path: Path, quant: QuantConfig):
        self.path = path
        self.quant = quant
        self.bits = quant.bits.get("routed_experts")
        self._f = open(path, "wb")
        self.layers: dict[str, dict] = {}

    def _put(self, array: np.ndarray) -> int:
        offset = self._f.tell()
        pad = -offset % STORE_ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            offset += pad
        self._f.write(np.ascontiguousarray(array, np.float32).tobytes())
        return offset

    def _quantized(self, gate_up: np.ndarray, down: np.ndarray) -> tuple[list[bytes], dict]:
        """One expert's record parts (scales first: 4-byte aligned views at the record's start)."""
        parts, layout = [[], [], []], {}
        for name, w in (("gate_up", gate_up), ("down", down)):
            bits, block = self.quant.layout_for("routed_experts", self.bits, w.shape[-1])
            q, d, zero = quantize_rows(w, bits, block, self.quant.scheme)  # [R, Kp], [R, Kp/B], [R, Kp/B]
            parts[0].append(d.astype(np.float32).tobytes())
            parts[1].append(pack(q, bits).tobytes())
            if zero is not None:
                parts[2].append(zero.tobytes())
            layout[name] = {"bits": bits, "block": block, "padded": int(q.shape[-1])}
        return [b for group in parts for b in group], layout

    def add_layer(self, i: int, w: ExpertWeights) -> None:
        E, inter, D = w.gate.shape
        offsets, layout, record = [], None, 3 * inter * D * 4
        for e in range(E):
            gate_up = np.concatenate([w.gate[e], w.up[e]], axis=0)  # [2I, D]
            if self.bits is None:
                offsets.append(self._put(gate_up))
                self._f.write(np.ascontiguousarray(w.down[e], np.float32).tobytes())  # [D, I], right after
                continue
            parts, layout = self._quantized(gate_up, np.asarray(w.down[e], np.float32))
            offsets.append(self._put(np.zeros(0, np.float32)))  # aligns; the record follows
            for part in parts:
                self._f.write(part)
            record = sum(len(part) for part in parts)
        router = self._put(w.router)  # [E, D]
        bias = self._put(w.bias) if w.bias is not None else None  # [E]
        self.layers[str(i)] = {"experts": E, "intermediate": inter, "hidden": D,
                               "record_bytes": record, "offsets": offsets,
                               "router": router, "bias": bias, "groups": list(w.groups)}
        if layout is not None:
            self.layers[str(i)]["quantized"] = layout

    def close(self) -> int:
        self._f.flush()
        size = self._f.tell()
        self._f.close()
        return size


class _SegmentEmitter(_DecoderEmitter):
    """The decoder's blocks (attention, dense MLP, norms, shared experts) from export.py's
    emitter; only the segment boundaries are new."""

    def open(self, layers: list[int], first: bool) -> str | None:
        g, cfg = self.g, self.cfg
        x = None
        if first:
            self.input_ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        else:
            x = g.input("hidden", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
        self.present = []
        if not layers:
            return x
        self.position_ids = g.input("position_ids", TensorProto.INT64, ["batch", "seq"])
        self.attention_mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
        if not first:
            self.input_ids = self.position_ids  # rope_and_mask reads only its shape [B, T]
        self.past = {i: g.input(f"past_latent.{i}", TensorProto.FLOAT, ["batch", "past_seq", cfg.latent_dim])
                     for i in layers}
        # rope_and_mask reads the cache length from past[0]; every layer's past has the same length
        self.past.setdefault(0, self.past[layers[0]])
        self.rope_and_mask()
        return x

    def dense_layer(self, x: str, t: dict[str, np.ndarray], i: int) -> str:
        return self.layer(x, t, i)  # a layer without routed experts is the fused decoder's layer

    def until_experts(self, x: str, t: dict[str, np.ndarray], i: int) -> ExpertWeights:
        """MoE layer i up to its routed experts; the segment's outputs are written here."""
        g, cfg = self.g, self.cfg
        D, k = cfg.hidden_size, cfg.num_experts_per_tok
        h = g.rms_norm(x, t["input_layernorm.weight"], cfg.rms_norm_eps, f"layers.{i}.input_layernorm")
        x = g.op("Add", [x, self.attention(h, t, i)], name=f"layers.{i}_attn_res")
        h = g.rms_norm(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps,
                       f"layers.{i}.post_attention_layernorm")
        p = f"layers.{i}.mlp"
        x2 = g.op("Reshape", [h, g.const([-1, D])], name=p + "_x2d")  # [N, D]
        w = ExpertWeights(t["mlp.router"], t.get("mlp.bias"), t["mlp.w_gate"], t["mlp.w_up"], t["mlp.w_down"],
                          cfg.expert_groups(i))
        residual = x
        if cfg.n_shared_experts:
            gate, up, down = (t[f"mlp.shared.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if self.quant.bits.get("shared_experts") is None:  # router and shared expert read the same input
                logits, a, b = g.linear_split(x2, [w.router, gate, up], p + ".router_shared")  # [N, E], [N, Is] x2
            else:  # the router stays fp32
                logits = g.linear(x2, w.router, p + ".router")
                a, b = self.linear_split(x2, [gate, up], p + ".shared.gate_up", "shared_experts")
            act = g.op("Mul", [g.op("Mul", [a, g.op("Sigmoid", [a], name=p + "_sig")], name=p + "_silu"), b],
                       name=p + "_act")
            shared = self.linear(act, down, p + ".shared.down_proj", "shared_experts")  # [N, D]
            residual = g.op("Add", [x, g.op("Reshape", [shared, g.op("Shape", [x], name=p + "_shape")],
                                            name=p + "_shared3")], name=p + "_residual")  # [B, T, D]
        else:
            logits = g.linear(x2, w.router, p + ".router")  # [N, E]
        raw, idx = emit_routing(g, logits, w, cfg, p)  # [N, k], [N, k]
        weights = final_weights(g, raw, cfg, p)  # [N, k]
        g.output(x2, f"moe_input.{i}", TensorProto.FLOAT, ["tokens", D])
        g.output(idx, f"router_ids.{i}", TensorProto.INT64, ["tokens", k])
        g.output(weights, f"router_weights.{i}", TensorProto.FLOAT, ["tokens", k])
        g.output(residual, f"residual.{i}", TensorProto.FLOAT, ["batch", "seq", D])
        return w

    def close_presents(self, layers: list[int]) -> None:
        for i, present in zip(layers, self.present):
            self.g.output(present, f"present_latent.{i}", TensorProto.FLOAT,
                          ["batch", "total_seq", self.cfg.latent_dim])


@dataclasses.dataclass(frozen=True)
class PagedExportResult:
    config: ModelConfig
    graphs: dict  # the manifest's graphs.decoder entry
    paging: dict  # the manifest's paging section (store index)
    weight_bytes: int  # non-expert weights in the segments + routed experts in the store
    non_expert_bytes: int


def export_paged(reader: CheckpointReader, out_dir: Path, export_cfg: ExportConfig,
                 progress: Callable[[str, int, int], None], kept_experts: dict[int, list[int]] | None = None
                 ) -> PagedExportResult:
    """Write segment_NN.onnx (+ .data) and experts.bin into out_dir, layer by layer."""
    quant = export_cfg.quant
    if quant.expert_bits:
        raise UserError("--expert-bits (per-expert widths) is not available for paged bundles yet; the store holds "
                        "every routed expert at one width")
    if "routed_experts" in quant.bits and quant.lowering != "ort":
        raise UserError("paged bundles with quantized routed experts need ONNX Runtime's lowering")
    reader.config = cfg = reader.config.with_kept_experts(kept_experts)
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise UserError("expert paging needs a model with routed experts; this one has none")
    out = Path(out_dir)
    D, V = cfg.hidden_size, cfg.vocab_size
    store = _StoreWriter(out / STORE_FILE, quant)
    plan = segment_plan(cfg)
    segments, non_expert = [], 0
    for j, seg in enumerate(plan):
        layers, moe = seg["layers"], seg["moe_layer"]
        g = GraphBuilder(out / (segment_file(j) + ".data"))
        em = _SegmentEmitter(g, cfg, export_cfg)
        x = em.open(layers, first=j == 0)
        if j == 0:
            embed = reader.get("model.embed_tokens.weight", (V, D)).numpy()
            x = g.op("Gather", [g.weight("embed_tokens.weight", embed), em.input_ids], name="embed",
                     axis=0)  # [B, T, D]
            del embed
        for i in layers:
            progress("export", i, cfg.num_hidden_layers)
            t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, i)}
            if i == moe:
                store.add_layer(i, em.until_experts(x, t, i))
            else:
                x = em.dense_layer(x, t, i)
            del t  # on disk now: memory stays at one layer
        em.close_presents(layers)
        if moe is None:  # final norm and output head
            x = g.rms_norm(x, reader.get("model.norm.weight", (D,)).numpy(), cfg.rms_norm_eps, "norm")
            x2 = g.op("Reshape", [x, g.const([-1, D])], name="final_2d")
            # a tied head is its own copy here: the embedding table lives in segment 0's file
            logits = em.linear(x2, reader.lm_head().numpy(), "lm_head", "lm_head")  # [N, V]
            shape = g.op("Concat", [g.op("Shape", [x], name="bt", start=0, end=2), g.const([V])], name="logits_shape",
                         axis=0)
            g.output(g.op("Reshape", [logits, shape], name="logits3"), "logits", TensorProto.FLOAT, ["batch", "seq", V])
        g.save(out / segment_file(j), f"dsexport_segment_{j}")
        non_expert += g.weight_bytes
        segments.append({"file": segment_file(j), "data": segment_file(j) + ".data", "layers": layers,
                         "moe_layer": moe})
    progress("export", cfg.num_hidden_layers, cfg.num_hidden_layers)
    store_bytes = store.close()
    expert_bytes = sum(entry["record_bytes"] * entry["experts"] for entry in store.layers.values())
    paging = {"version": PAGING_VERSION, "file": STORE_FILE, "align": STORE_ALIGN, **store_format(quant),
              "layers": store.layers, "routed_expert_bytes": expert_bytes, "store_bytes": store_bytes,
              "non_expert_bytes": non_expert, "default_cache_mb": None}
    graphs = {"paged": True, "moe_lowering": PAGED_LOWERING, "segments": segments}
    return PagedExportResult(cfg, graphs, paging, non_expert + expert_bytes, non_expert)


def store_format(quant: QuantConfig) -> dict:
    """The manifest's description of the store's records: precision, bits, block, scheme, and the
    activation quantization the fused QMoE applies (the runtime emulates it: runtime/paging.py)."""
    bits = quant.bits.get("routed_experts")
    if bits is None:
        return {"precision": "fp32", "bits": None, "block": None, "scheme": None, "zero_points": False,
                "activations": "fp32",
                "record": "w_gate_up float32 [2I, D] (gate rows, then up rows), then w_down float32 [D, I]"}
    zero = quant.scheme == "asymmetric"
    block = quant.block_for("routed_experts")
    # ONNX Runtime 1.32's 8-bit QMoE always quantizes its activations; 4-bit does at accuracy_level 4
    activations = "int8" if bits == 8 or quant.activations == "int8" else "fp32"
    return {"precision": f"int{bits}", "bits": bits, "block": block, "scheme": quant.scheme, "zero_points": zero,
            "activations": activations, "activation_block": block,
            "record": "scales float32 [2I, D/B], [D, I/B]; q uint8 [2I, D*bits/8], [D, I*bits/8] (int4: even "
                      "index in the low nibble)" + ("; zero points uint8 [2I, D/B], [D, I/B]" if zero else "")}


def paging_choice(build, target, memory_plan: dict) -> tuple[bool, float | None]:
    """(page the experts?, the bundle's default expert cache in MiB or None for all of them).
    Explicit --paged on a backend that cannot page is refused with the reason."""
    paging = memory_plan.get("paging", {})
    if build.paged and not paging.get("can_page", False):
        reason = paging.get("reason", "its backend cannot page")
        raise UserError(f"--paged is not available for {target.name}: {reason}")
    paged = bool(paging.get("chosen"))
    if not paged:
        if build.expert_cache_mb is not None:
            raise UserError("--expert-cache-mb sets a paged bundle's default cache; add --paged")
        return False, None
    if build.expert_cache_mb is not None:
        if build.expert_cache_mb <= 0:
            raise UserError(f"--expert-cache-mb must be positive, got {build.expert_cache_mb}")
        return True, float(build.expert_cache_mb)
    cache = paging.get("cache_bytes")
    return True, (round(cache / 2**20, 3) if cache is not None else None)
