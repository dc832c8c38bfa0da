"""Export the checkpoint's MTP module (docs/mtp.md) as its own ONNX graph, `mtp.onnx`.

The graph contract (docs/graph-contract.md, "The MTP graph"):
  inputs   hidden_states [B, T, D] float32 (the decoder's final-normed `hidden_states` of tokens t),
           input_ids [B, T] int64 (tokens t+1), position_ids [B, T] int64 (positions of tokens t),
           attention_mask [B, P+T] int64, past_latent [B, P, kv_lora_rank + qk_rope_head_dim] float32
  outputs  logits [B, T, V] float32 (for tokens t+2), present_latent [B, P+T, kv_lora_rank + qk_rope_head_dim]

The block is emitted by the main exporter's DecoderEmitter (the same MLA, MoE lowering and
quantization as the decoder's layers), at layer index num_hidden_layers. The embedding table
and the output head are the main model's: instead of copies, the MTP graph's initializers of
the same name point at the decoder's external-data file (model.onnx.data) at the decoder's
offsets, so they cost no bytes on disk and, mapped, no second copy in memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from dsexport.core.errors import InternalError

from .checkpoint import CheckpointReader
from dsexport.core.contract import HIDDEN_STATES, MTP_PAST, MTP_PRESENT

from dsexport.core.sections import NativeMTP

from .emit import DecoderEmitter
from .export import DATA_FILE, GRAPH_FILE, ExportConfig
from .graph import GraphBuilder
from .native_index import fused_unsupported, mtp_block
from .reference import layer_tensors

MTP_GRAPH_FILE = "mtp.onnx"
MTP_DATA_FILE = "mtp.onnx.data"
# The MTP graph's logits against the torch MTPModule on the same hidden states (fp32 bundles);
# measured max |diff| on the embedded model: see docs/mtp.md.
MTP_LOGIT_TOL = 1e-4


def has_mtp_weights(reader: CheckpointReader) -> bool:
    return f"model.layers.{reader.config.num_hidden_layers}.eh_proj.weight" in reader


class SharedWeightsBuilder(GraphBuilder):
    """A GraphBuilder whose weights that the decoder graph already holds (same name, dtype and
    shape) are not written again: their initializers point into the decoder's data file."""

    def __init__(self, data_path: Path, shared: dict[str, TensorProto]):
        super().__init__(data_path)
        self.shared = shared
        self.shared_used: dict[str, int] = {}  # name -> bytes read from the decoder's data file

    def weight(self, name: str, array: np.ndarray) -> str:
        main = self.shared.get(name)
        if main is None or tuple(main.dims) != tuple(array.shape) or onnx.helper.tensor_dtype_to_np_dtype(
                main.data_type) != array.dtype:
            return super().weight(name, array)
        if name not in self.shared_used:
            tensor = TensorProto()
            tensor.CopyFrom(main)
            self.initializers.append(tensor)
            self.shared_used[name] = int(array.nbytes)
        return name


def _decoder_initializers(out_dir: Path) -> dict[str, TensorProto]:
    """The decoder graph's weights that live in its external-data file, by name."""
    model = onnx.load(str(out_dir / GRAPH_FILE), load_external_data=False)
    shared = {}
    for init in model.graph.initializer:
        where = {e.key: e.value for e in init.external_data}
        if init.data_location == TensorProto.EXTERNAL and where.get("location") == DATA_FILE:
            shared[init.name] = init
    return shared


def _emit_mtp(g: GraphBuilder, reader: CheckpointReader, export_cfg: ExportConfig,
              progress: Callable[[str, int, int], None]) -> None:
    """The MTP block over the graph's own inputs, with the decoder's blocks (exporter/emit.py)."""
    cfg = reader.config
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    p = f"model.layers.{L}."
    progress("export mtp", 0, 1)
    em = DecoderEmitter(g, cfg, export_cfg.moe_lowering, export_cfg.prefill_moe_lowering, export_cfg.moe_shards,
                        export_cfg.quant)
    hidden_in = g.input(HIDDEN_STATES, TensorProto.FLOAT, ["batch", "seq", D])
    em.token_inputs()
    past = g.input(MTP_PAST, TensorProto.FLOAT, ["batch", "past_seq", cfg.latent_dim])
    em.past = {L: past}  # attention reads past[layer index]
    em.rope_and_mask(em.input_ids)
    embed_name = g.weight("embed_tokens.weight", reader.get("model.embed_tokens.weight", (V, D)).numpy())  # shared
    emb = g.op("Gather", [embed_name, em.input_ids], name="mtp.embed", axis=0)  # [B, T, D] tokens t+1
    emb = g.rms_norm(emb, reader.get(p + "enorm.weight", (D,)).numpy(), cfg.rms_norm_eps, "mtp.enorm")
    hid = g.rms_norm(hidden_in, reader.get(p + "hnorm.weight", (D,)).numpy(), cfg.rms_norm_eps, "mtp.hnorm")
    x = g.op("Concat", [emb, hid], name="mtp.eh_concat", axis=-1)  # [B, T, 2D], embedding first
    # eh_proj stays fp32 at every precision: it is not one of the quantized parts (core/quant.py PARTS)
    x = g.linear(x, reader.get(p + "eh_proj.weight", (D, 2 * D)).numpy(), "mtp.eh_proj")  # [B, T, D]
    t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, L)}
    x = em.layer(x, t, L)
    del t
    # The head exactly as the decoder emits it (exporter/export.py), so its weights are shared.
    tied = em.tied_head_ok(cfg.tie_word_embeddings or "lm_head.weight" not in reader)
    em.head(x, reader.get(p + "shared_head.norm.weight", (D,)).numpy(), None if tied else reader.lm_head().numpy(),
            embed_name, "mtp.shared_head_norm", em.input_ids)
    g.output(em.present[0], MTP_PRESENT, TensorProto.FLOAT, ["batch", "total_seq", cfg.latent_dim])
    progress("export mtp", 1, 1)


@dataclasses.dataclass(frozen=True)
class MTPExportResult:
    weight_bytes: int  # written to mtp.onnx.data
    shared_bytes: int  # read from the decoder's model.onnx.data instead of copied
    shared_weights: tuple[str, ...]
    native: NativeMTP | None = None  # where the native decoder finds the block (exporter/native_index.py)


def export_mtp(reader: CheckpointReader, out_dir: Path, export_cfg: ExportConfig,
               progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> MTPExportResult:
    """Write mtp.onnx + mtp.onnx.data beside the decoder graph (export_model first: the MTP
    graph points into the decoder's data file)."""
    if not has_mtp_weights(reader):
        raise InternalError("export_mtp called on a checkpoint without MTP weights")
    out = Path(out_dir)
    g = SharedWeightsBuilder(out / MTP_DATA_FILE, _decoder_initializers(out))
    _emit_mtp(g, reader, export_cfg, progress)
    g.save(out / MTP_GRAPH_FILE, "dsexport_mtp")
    cfg = reader.config
    native = None
    if fused_unsupported(cfg, export_cfg.quant, export_cfg.moe_lowering) is None:
        native = mtp_block(g, MTP_DATA_FILE, cfg, export_cfg.quant, export_cfg.moe_shards)
    return MTPExportResult(g.weight_bytes, sum(g.shared_used.values()), tuple(sorted(g.shared_used)), native)


def reference_mtp(reader: CheckpointReader, quant=None):
    """The torch MTPModule and a stand-in for the main model it reads (embedding, head, rope):
    with `quant`, the dequantized weights (and activation rounding) the quantized graph computes
    with, as exporter/reference.py builds the main model."""
    from types import SimpleNamespace

    from torch import nn

    from .mtp import MTPModule
    from .quantize import fake_quantize
    from .reference import quantize_inputs, set_activation_quant
    from .rope import rope_frequencies

    cfg = reader.config
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    mtp = MTPModule.from_checkpoint(reader)
    if quant is not None:
        block = {n: fake_quantize(n, t, quant, L, cfg.expert_ids(L)) for n, t in layer_tensors(reader, L)}
        mtp.block.load_state_dict(block, strict=True, assign=True)
        set_activation_quant(mtp.block, quant)
    head = nn.Linear(D, V, bias=False)
    head.weight = nn.Parameter(fake_quantize("lm_head.weight", reader.lm_head(), quant) if quant else reader.lm_head())
    block = quant.projection_activation_block("lm_head") if quant is not None else None
    if block:
        quantize_inputs(head, block)
    inv_freq, rope_scale = rope_frequencies(cfg)
    main = SimpleNamespace(embed_tokens=nn.Embedding.from_pretrained(reader.get("model.embed_tokens.weight", (V, D))),
                           lm_head=head, inv_freq=inv_freq, rope_scale=rope_scale)
    return mtp, main


def verify_mtp(reader: CheckpointReader, engine, quant=None, tolerance: float = MTP_LOGIT_TOL,
               tokens: int = 12) -> dict:
    """The build's check of mtp.onnx against the torch MTPModule, both fed the decoder graph's
    hidden states for a fixed token sequence: over the whole sequence at once and again
    incrementally through the cache (a prompt, then steps of 1 and 2 tokens, as drafting runs it).
    Returns {max_logit_diff, incremental_max_diff}; raises InternalError above `tolerance`."""
    import torch

    from dsexport.runtime.speculative import MTPGraph

    cfg = reader.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, tokens))
    ones = lambda n: np.ones((1, n), np.int64)  # noqa: E731
    _, hidden, _ = engine.backend.forward_hidden(ids, np.arange(tokens)[None], ones(tokens), engine.empty_cache(1))
    T = tokens - 1  # MTP positions: h_t with token t+1
    graph = MTPGraph.load(engine.bundle)
    full, _ = graph.forward(hidden[:, :T], ids[:, 1:], np.arange(T)[None], ones(T), graph.empty_cache())  # [1, T, V]
    parts, cache, start = [], graph.empty_cache(), 0
    for step in (T - 3, 1, 2):
        logits, cache = graph.forward(hidden[:, start:start + step], ids[:, start + 1:start + step + 1],
                                      np.arange(start, start + step)[None], ones(start + step), cache)
        parts.append(logits)
        start += step
    mtp, main = reference_mtp(reader, quant)
    with torch.no_grad():
        expected = mtp.predict(main, torch.from_numpy(hidden[:, :T]), torch.from_numpy(ids[:, 1:])).numpy()
    diff = float(np.abs(full - expected).max())
    incremental = float(np.abs(np.concatenate(parts, axis=1) - expected).max())
    if not max(diff, incremental) <= tolerance:
        raise InternalError(f"the exported MTP graph disagrees with the MTP module: max |logit diff| {diff:.3g} "
                            f"(incremental {incremental:.3g}), tolerance {tolerance:g}")
    return {"max_logit_diff": diff, "incremental_max_diff": incremental, "tolerance": tolerance}
