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

from dsexport.core.config import ModelConfig
from dsexport.core.contract import (ATTENTION_MASK, HIDDEN, INPUT_IDS, POSITION_IDS, moe_input_name, present_name,
                                    residual_name, router_ids_name, router_weights_name)
from dsexport.core.errors import UserError
from dsexport.core.manifest import Segment
from dsexport.core.quant import QuantSpec, pack, quantize_rows
from dsexport.core.sections import NativeSection, PagingSection, StoreLayer, StoreMatrix

from .checkpoint import CheckpointReader
from .emit import DecoderEmitter
from .export import ExportConfig
from .graph import GraphBuilder
from .lowering import ExpertWeights, emit_routing, final_weights
from .native_index import NativeIndexer, unsupported
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
    """Writes experts.bin one layer at a time and keeps its index. quant: the bundle's QuantSpec;
    routed experts at its bits (None: fp32)."""

    def __init__(self, path: Path, quant: QuantSpec | None):
        self.path = path
        self.quant = quant
        self.bits = quant.bits.get("routed_experts") if quant is not None else None
        self._f = open(path, "wb")
        self.layers: dict[int, StoreLayer] = {}

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
            layout[name] = StoreMatrix(bits, block, int(q.shape[-1]))
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
        self.layers[i] = StoreLayer(E, inter, D, record, tuple(offsets), router, bias, tuple(w.groups), layout)

    def close(self) -> int:
        self._f.flush()
        size = self._f.tell()
        self._f.close()
        return size


def _segment(reader: CheckpointReader, out: Path, export_cfg: ExportConfig, store: "_StoreWriter", j: int,
             layers: list[int], moe: int | None, progress: Callable[[str, int, int], None]) -> GraphBuilder:
    """Segment j: its dense layers, then MoE layer `moe` up to its routed experts (whose weights go
    to the store), or, for the last segment, the final norm and the output head."""
    cfg = reader.config
    D, V, k = cfg.hidden_size, cfg.vocab_size, cfg.num_experts_per_tok
    g = GraphBuilder(out / (segment_file(j) + ".data"))
    em = DecoderEmitter(g, cfg, export_cfg.moe_lowering, None, export_cfg.moe_shards, export_cfg.quant)
    if j == 0:
        em.input_ids = g.input(INPUT_IDS, TensorProto.INT64, ["batch", "seq"])
        x = g.op("Gather", [g.weight("embed_tokens.weight", reader.get("model.embed_tokens.weight", (V, D)).numpy()),
                            em.input_ids], name="embed", axis=0)  # [B, T, D]
    else:
        x = g.input(HIDDEN, TensorProto.FLOAT, ["batch", "seq", D])
    if layers:
        em.position_ids = g.input(POSITION_IDS, TensorProto.INT64, ["batch", "seq"])
        em.attention_mask = g.input(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"])
        em.cache_inputs(layers)
        em.rope_and_mask(x)
    for i in layers:
        progress("export", i, cfg.num_hidden_layers)
        t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, i)}
        if i != moe:
            x = em.layer(x, t, i)
            continue
        x, front = em.layer_until_experts(x, t, i)
        raw, idx = emit_routing(g, front.logits, front.weights, cfg, f"layers.{i}.mlp")  # [N, k], [N, k]
        residual = x
        if front.shared is not None:  # residual stream + shared experts [B, T, D]
            shared = g.op("Reshape", [front.shared, g.op("Shape", [x], name=f"layers.{i}.mlp_shape")],
                          name=f"layers.{i}.mlp_shared3")
            residual = g.op("Add", [x, shared], name=f"layers.{i}.mlp_residual")
        g.output(front.x2, moe_input_name(i), TensorProto.FLOAT, ["tokens", D])
        g.output(idx, router_ids_name(i), TensorProto.INT64, ["tokens", k])
        g.output(final_weights(g, raw, cfg, f"layers.{i}.mlp"), router_weights_name(i), TensorProto.FLOAT, ["tokens", k])
        g.output(residual, residual_name(i), TensorProto.FLOAT, ["batch", "seq", D])
        store.add_layer(i, front.weights)
    for i, present in zip(layers, em.present):
        g.output(present, present_name(i), TensorProto.FLOAT, ["batch", "total_seq", cfg.latent_dim])
    if moe is None:  # a tied head is its own copy here: the embedding table lives in segment 0's file
        em.head(x, reader.get("model.norm.weight", (D,)).numpy(), reader.lm_head().numpy(), None, "norm", x)
    return g


@dataclasses.dataclass(frozen=True)
class PagedExportResult:
    config: ModelConfig
    segments: tuple[Segment, ...]
    paging: PagingSection
    weight_bytes: int  # non-expert weights in the segments + routed experts in the store
    non_expert_bytes: int
    native: NativeSection | None = None  # where the native decoder finds the weights (None: it cannot run them)


def export_paged(reader: CheckpointReader, out_dir: Path, export_cfg: ExportConfig,
                 progress: Callable[[str, int, int], None], kept_experts: dict[int, list[int]] | None = None
                 ) -> PagedExportResult:
    """Write segment_NN.onnx (+ .data) and experts.bin into out_dir, layer by layer."""
    quant = export_cfg.quant
    if quant is not None and quant.expert_bits:
        raise UserError("--expert-bits (per-expert widths) is not available for paged bundles yet; the store holds "
                        "every routed expert at one width")
    if quant is not None and "routed_experts" in quant.bits and quant.lowering != "ort":
        raise UserError("paged bundles with quantized routed experts need ONNX Runtime's lowering")
    reader = reader.with_config(reader.config.with_kept_experts(kept_experts))
    cfg = reader.config
    if not cfg.moe_layers:
        raise UserError("expert paging needs a model with routed experts; this one has none")
    out = Path(out_dir)
    store = _StoreWriter(out / STORE_FILE, quant)
    segments, non_expert = [], 0
    indexer = NativeIndexer(cfg, quant) if unsupported(cfg, quant) is None else None
    plan = segment_plan(cfg)
    for j, seg in enumerate(plan):
        g = _segment(reader, out, export_cfg, store, j, seg["layers"], seg["moe_layer"], progress)
        if indexer is not None:
            indexer.add_segment(g, segment_file(j) + ".data", seg["layers"], j == 0, j == len(plan) - 1)
        g.save(out / segment_file(j), f"dsexport_segment_{j}")
        non_expert += g.weight_bytes
        segments.append(Segment(segment_file(j), segment_file(j) + ".data", tuple(seg["layers"]), seg["moe_layer"]))
    progress("export", cfg.num_hidden_layers, cfg.num_hidden_layers)
    store_bytes = store.close()
    expert_bytes = sum(layer.record_bytes * layer.experts for layer in store.layers.values())
    paging = PagingSection(version=PAGING_VERSION, file=STORE_FILE, align=STORE_ALIGN, **store_format(quant),
                           layers=dict(store.layers), routed_expert_bytes=expert_bytes, store_bytes=store_bytes,
                           non_expert_bytes=non_expert, default_cache_mb=None)
    return PagedExportResult(cfg, tuple(segments), paging, non_expert + expert_bytes, non_expert,
                             indexer.section() if indexer is not None else None)


def store_format(quant: QuantSpec | None) -> dict:
    """The paging section's description of the store's records: precision, bits, block, scheme, and
    the activation rounding the fused QMoE applies (the runtime emulates it: runtime/paging.py)."""
    bits = quant.bits.get("routed_experts") if quant is not None else None
    if bits is None:
        return {"precision": "fp32", "bits": None, "block": None, "scheme": None, "zero_points": False,
                "activations": "fp32",
                "record": "w_gate_up float32 [2I, D] (gate rows, then up rows), then w_down float32 [D, I]"}
    zero = quant.scheme == "asymmetric"
    block = quant.block_for("routed_experts")
    rounded = quant.expert_activation_block(bits)
    return {"precision": f"int{bits}", "bits": bits, "block": block, "scheme": quant.scheme, "zero_points": zero,
            "activations": "int8" if rounded else "fp32", "activation_block": block,
            "record": "scales float32 [2I, D/B], [D, I/B]; q uint8 [2I, D*bits/8], [D, I*bits/8] (int4: even "
                      "index in the low nibble)" + ("; zero points uint8 [2I, D/B], [D, I/B]" if zero else "")}
