"""Export the checkpoint's MTP module (docs/mtp.md) as its own ONNX graph, `mtp.onnx`.

The graph contract (docs/graph-contract.md, "The MTP graph"):
  inputs   hidden_states [B, T, D] float32 (the decoder's final-normed `hidden_states` of tokens t),
           input_ids [B, T] int64 (tokens t+1), position_ids [B, T] int64 (positions of tokens t),
           attention_mask [B, P+T] int64, past_latent [B, P, kv_lora_rank + qk_rope_head_dim] float32
  outputs  logits [B, T, V] float32 (for tokens t+2), present_latent [B, P+T, kv_lora_rank + qk_rope_head_dim]

The block is emitted by the main exporter's _DecoderEmitter (the same MLA, MoE lowering and
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

from dsexport.errors import InternalError

from .checkpoint import CheckpointReader
from .config import ModelConfig
from .export import DATA_FILE, GRAPH_FILE, ExportConfig, _DecoderEmitter
from .graph import GraphBuilder
from .reference import layer_tensors

MTP_GRAPH_FILE = "mtp.onnx"
MTP_DATA_FILE = "mtp.onnx.data"
# The MTP graph's logits against the torch MTPModule on the same hidden states (fp32 bundles);
# measured max |diff| on the embedded model: see docs/mtp.md.
MTP_LOGIT_TOL = 1e-4


def has_mtp_weights(reader: CheckpointReader) -> bool:
    return f"model.layers.{reader.config.num_hidden_layers}.eh_proj.weight" in reader


def mtp_graph_contract(cfg: ModelConfig) -> dict:
    L, D, V = cfg.latent_dim, cfg.hidden_size, cfg.vocab_size
    return {
        "inputs": [
            {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", D]},
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_seq"]},
            {"name": "past_latent", "dtype": "float32", "shape": ["batch", "past_seq", L]},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", V]},
            {"name": "present_latent", "dtype": "float32", "shape": ["batch", "total_seq", L]},
        ],
        "cache": {"layout": "the MTP block's own latent, as the decoder's layers (one layer)",
                  "values_per_token_per_layer": L},
        "layer_index": cfg.num_hidden_layers,
    }


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


class _MTPEmitter(_DecoderEmitter):
    """The decoder emitter's attention / MoE / layer methods over the MTP graph's own inputs."""

    def inputs(self) -> None:
        g, cfg = self.g, self.cfg
        self.hidden_in = g.input("hidden_states", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
        self.input_ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        self.position_ids = g.input("position_ids", TensorProto.INT64, ["batch", "seq"])
        self.attention_mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
        past = g.input("past_latent", TensorProto.FLOAT, ["batch", "past_seq", cfg.latent_dim])
        # rope_and_mask reads the cache length from past[0], attention reads past[layer index]
        self.past = {0: past, cfg.num_hidden_layers: past}

    def run(self, reader: CheckpointReader, progress: Callable[[str, int, int], None]) -> None:
        g, cfg = self.g, self.cfg
        D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
        p = f"model.layers.{L}."
        progress("export mtp", 0, 1)
        self.inputs()
        self.rope_and_mask()
        self.present: list[str] = []
        embed = reader.get("model.embed_tokens.weight", (V, D)).numpy()
        embed_name = g.weight("embed_tokens.weight", embed)  # shared with the decoder graph
        emb = g.op("Gather", [embed_name, self.input_ids], name="mtp.embed", axis=0)  # [B, T, D] tokens t+1
        emb = g.rms_norm(emb, reader.get(p + "enorm.weight", (D,)).numpy(), cfg.rms_norm_eps, "mtp.enorm")
        hid = g.rms_norm(self.hidden_in, reader.get(p + "hnorm.weight", (D,)).numpy(), cfg.rms_norm_eps, "mtp.hnorm")
        x = g.op("Concat", [emb, hid], name="mtp.eh_concat", axis=-1)  # [B, T, 2D], embedding first
        # eh_proj stays fp32 at every precision: it is not one of the quantized parts (quantize.PARTS)
        x = g.linear(x, reader.get(p + "eh_proj.weight", (D, 2 * D)).numpy(), "mtp.eh_proj")  # [B, T, D]
        t = {name: tensor.numpy() for name, tensor in layer_tensors(reader, L)}
        x = self.layer(x, t, L)
        del t
        x = g.rms_norm(x, reader.get(p + "shared_head.norm.weight", (D,)).numpy(), cfg.rms_norm_eps,
                       "mtp.shared_head_norm")
        x2 = g.op("Reshape", [x, g.const([-1, D])], name="mtp.final_2d")
        # The head exactly as the decoder emits it (export.py run), so its weights are shared.
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in reader
        if tied and self.quant.bits.get("lm_head") is None:
            logits = g.op("Gemm", [x2, embed_name], name="lm_head", transB=1)  # [N, V]
        else:
            logits = self.linear(x2, reader.lm_head().numpy(), "lm_head", "lm_head")  # [N, V]
        out_shape = g.op("Concat", [g.op("Shape", [self.input_ids], name="bt"), g.const([V])], name="logits_shape",
                         axis=0)
        g.output(g.op("Reshape", [logits, out_shape], name="logits3"), "logits", TensorProto.FLOAT, ["batch", "seq", V])
        g.output(self.present[0], "present_latent", TensorProto.FLOAT, ["batch", "total_seq", cfg.latent_dim])
        progress("export mtp", 1, 1)


@dataclasses.dataclass(frozen=True)
class MTPExportResult:
    weight_bytes: int  # written to mtp.onnx.data
    shared_bytes: int  # read from the decoder's model.onnx.data instead of copied
    shared_weights: tuple[str, ...]


def export_mtp(reader: CheckpointReader, out_dir: Path, export_cfg: ExportConfig,
               progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> MTPExportResult:
    """Write mtp.onnx + mtp.onnx.data beside the decoder graph (export_model first: the MTP
    graph points into the decoder's data file)."""
    if not has_mtp_weights(reader):
        raise InternalError("export_mtp called on a checkpoint without MTP weights")
    out = Path(out_dir)
    g = SharedWeightsBuilder(out / MTP_DATA_FILE, _decoder_initializers(out))
    _MTPEmitter(g, reader.config, export_cfg).run(reader, progress)
    g.save(out / MTP_GRAPH_FILE, "dsexport_mtp")
    return MTPExportResult(g.weight_bytes, sum(g.shared_used.values()), tuple(sorted(g.shared_used)))


def reference_mtp(reader: CheckpointReader, quant=None):
    """The torch MTPModule and a stand-in for the main model it reads (embedding, head, rope):
    with `quant`, the dequantized weights (and activation rounding) the quantized graph computes
    with, as exporter/reference.py builds the main model."""
    from types import SimpleNamespace

    from torch import nn

    from .mtp import MTPModule
    from .quantize import fake_quantize
    from .reference import _quantize_inputs, _set_activation_quant
    from .rope import rope_frequencies

    cfg = reader.config
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    mtp = MTPModule.from_checkpoint(reader)
    if quant is not None:
        block = {n: fake_quantize(n, t, quant, L, cfg.expert_ids(L)) for n, t in layer_tensors(reader, L)}
        mtp.block.load_state_dict(block, strict=True, assign=True)
        _set_activation_quant(mtp.block, quant)
    head = nn.Linear(D, V, bias=False)
    head.weight = nn.Parameter(fake_quantize("lm_head.weight", reader.lm_head(), quant) if quant else reader.lm_head())
    if quant is not None and quant.activations == "int8" and quant.bits.get("lm_head"):
        _quantize_inputs(head, quant.block_size)
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

    from dsexport.runtime.speculative import MTPGraph, decoder_forward

    cfg = reader.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, tokens))
    ones = lambda n: np.ones((1, n), np.int64)  # noqa: E731
    _, hidden, _ = decoder_forward(engine.session, ids, np.arange(tokens)[None], ones(tokens), engine.empty_cache(1))
    T = tokens - 1  # MTP positions: h_t with token t+1
    graph = MTPGraph.load(engine.directory, engine.manifest)
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
