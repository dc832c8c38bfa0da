"""Export a DeepSeek checkpoint to one ONNX decoder graph with a latent KV cache, layer by layer.

The graph contract (docs/graph-contract.md):
  inputs   input_ids [B, T] int64, position_ids [B, T] int64, attention_mask [B, P+T] int64,
           past_latent.{i} [B, P, kv_lora_rank + qk_rope_head_dim] float32 for each layer i
  outputs  logits [B, T, V] float32, present_latent.{i} [B, P+T, kv_lora_rank + qk_rope_head_dim]

Attention runs on the latent: W_UK (the key half of kv_b_proj) is absorbed into the query and
W_UV (the value half) into the output, so keys and values are never expanded per head and the
cache holds only the normalized latent and the rotated rope key.

Tensors are read from the checkpoint one layer at a time and written straight to the external
data file, so peak memory is one layer plus the embeddings, whatever the depth. The blocks are
exporter/emit.py's; the contract's names are core/contract.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from onnx import TensorProto

from dsexport.core.config import ModelConfig
from dsexport.core.contract import HIDDEN_STATES, present_name
from dsexport.core.quant import QuantSpec
from dsexport.core.sections import NativeSection

from .checkpoint import CheckpointReader
from .emit import DecoderEmitter
from .graph import OPSET, GraphBuilder
from .native_index import NativeIndexer, fused_unsupported
from .reference import layer_tensors

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    moe_lowering: str = "ort-moe"
    moe_shards: int = 1  # see lowering.LoweringOptions
    # Another MoE lowering for prompts (T > 1), chosen in the graph by an If on the token count;
    # for decode-only lowerings such as `gather` (TensorRT targets). None: one lowering for both.
    prefill_moe_lowering: str | None = None
    quant: QuantSpec | None = None  # block-wise int8/int4 weights per part (core/quant.py); None: fp32
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
    native: NativeSection | None = None  # where the native decoder finds each weight (exporter/native_index.py)


def export_decoder(reader: CheckpointReader, out: Path, export_cfg: ExportConfig,
                   progress: Callable[[str, int, int], None]) -> GraphBuilder:
    """The fused decoder: embedding, every layer, final norm and head, written layer by layer."""
    cfg = reader.config
    D, V = cfg.hidden_size, cfg.vocab_size
    g = GraphBuilder(out / DATA_FILE, export_cfg.opset)
    em = DecoderEmitter(g, cfg, export_cfg.moe_lowering, export_cfg.prefill_moe_lowering, export_cfg.moe_shards,
                        export_cfg.quant)
    em.token_inputs()
    em.cache_inputs(range(cfg.num_hidden_layers))
    em.rope_and_mask(em.input_ids)
    embed_name = g.weight("embed_tokens.weight", reader.get("model.embed_tokens.weight", (V, D)).numpy())
    x = g.op("Gather", [embed_name, em.input_ids], name="embed", axis=0)  # [B, T, D]
    for i in range(cfg.num_hidden_layers):
        progress("export", i, cfg.num_hidden_layers)
        t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, i)}
        x = em.layer(x, t, i)
        del t  # this layer's weights are on disk now; keep memory at one layer
    progress("export", cfg.num_hidden_layers, cfg.num_hidden_layers)
    tied = em.tied_head_ok(cfg.tie_word_embeddings or "lm_head.weight" not in reader)
    x = em.head(x, reader.get("model.norm.weight", (D,)).numpy(), None if tied else reader.lm_head().numpy(),
                embed_name, "norm", em.input_ids)
    for i, present in enumerate(em.present):
        g.output(present, present_name(i), TensorProto.FLOAT, ["batch", "total_seq", cfg.latent_dim])
    if export_cfg.hidden_states:  # the final-normed state [B, T, D], the MTP graph's input
        g.output(x, HIDDEN_STATES, TensorProto.FLOAT, ["batch", "seq", D])
    return g


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def export_model(checkpoint_dir: str | Path | CheckpointReader, out_dir: str | Path,
                 export_cfg: ExportConfig = ExportConfig(),
                 progress: Callable[[str, int, int], None] = _no_progress,
                 kept_experts: dict[int, list[int]] | None = None) -> ExportResult:
    """Write the decoder graph (model.onnx + model.onnx.data) into out_dir.

    kept_experts: {layer: original expert ids to keep}; other layers keep all their experts.
    The bundle around it (manifest, tokenizer, checksums) is dsexport.build's job.
    """
    reader = checkpoint_dir if isinstance(checkpoint_dir, CheckpointReader) else CheckpointReader(checkpoint_dir)
    reader = reader.with_config(reader.config.with_kept_experts(kept_experts))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = export_decoder(reader, out, export_cfg, progress)
    g.save(out / GRAPH_FILE, "dsexport_decoder")
    return ExportResult(out, reader.config, export_cfg, g.weight_bytes, native_section(g, reader.config, export_cfg))


def native_section(g: GraphBuilder, cfg: ModelConfig, export_cfg: ExportConfig) -> NativeSection | None:
    """The fused graph's weights located for the native decoder, or None where it cannot run them."""
    if fused_unsupported(cfg, export_cfg.quant, export_cfg.moe_lowering) is not None:
        return None
    indexer = NativeIndexer(cfg, export_cfg.quant)
    indexer.add_segment(g, DATA_FILE, list(range(cfg.num_hidden_layers)), True, True)
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            indexer.add_routed(g, DATA_FILE, i, export_cfg.moe_shards)
    return indexer.section()
