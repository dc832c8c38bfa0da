"""The graphs' contract: input and output names, dtypes and shapes (docs/graph-contract.md).

The exporter writes graphs with these names, the manifest records them, and every runtime
backend (ONNX Runtime, the paged segments, TensorRT, the MTP drafter) builds its feeds from them;
nothing else spells a tensor name.

  decoder  inputs   input_ids [B, T] int64, position_ids [B, T] int64, attention_mask [B, P+T] int64,
                    past_latent.{i} [B, P, kv_lora_rank + qk_rope_head_dim] float32 per layer i
           outputs  logits [B, T, V] float32, present_latent.{i} [B, P+T, L], and in bundles with an
                    MTP graph hidden_states [B, T, D] (the final-normed state the MTP graph reads)
  mtp      inputs   hidden_states [B, T, D], input_ids [B, T] (tokens t+1), position_ids, attention_mask,
                    past_latent [B, P, L]; outputs logits [B, T, V], present_latent [B, P+T, L]
  segment  (paged bundles) per MoE layer i: moe_input.{i} [N, D], router_ids.{i} [N, k] int64,
                    router_weights.{i} [N, k], residual.{i} [B, T, D]; later segments read `hidden`
"""

from __future__ import annotations

import dataclasses

from dsexport.core.config import ModelConfig

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"
HIDDEN = "hidden"  # a paged segment's input from the previous segment
MTP_PAST = "past_latent"
MTP_PRESENT = "present_latent"
TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS, ATTENTION_MASK)
DTYPES = ("float32", "float16", "int64", "int32")
CACHE_LAYOUT = "per layer [batch, seq, kv_lora_rank + qk_rope_head_dim]: RMS-normalized latent, then rotated rope key"


def past_name(layer: int) -> str:
    return f"past_latent.{layer}"


def present_name(layer: int) -> str:
    return f"present_latent.{layer}"


def layer_of(name: str, prefix: str) -> int | None:
    """The layer index of `prefix.{i}` names (past_latent.3 -> 3), else None."""
    head, _, tail = name.rpartition(".")
    return int(tail) if head == prefix and tail.isdigit() else None


def moe_input_name(layer: int) -> str:
    return f"moe_input.{layer}"


def router_ids_name(layer: int) -> str:
    return f"router_ids.{layer}"


def router_weights_name(layer: int) -> str:
    return f"router_weights.{layer}"


def residual_name(layer: int) -> str:
    return f"residual.{layer}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[str | int, ...]  # symbolic dims are names

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    layout: str
    values_per_token_per_layer: int

    def to_json(self) -> dict:
        return {"layout": self.layout, "values_per_token_per_layer": self.values_per_token_per_layer}


@dataclasses.dataclass(frozen=True)
class GraphContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cache: CacheSpec

    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def has_hidden_states(self) -> bool:
        return HIDDEN_STATES in self.output_names()

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "cache": self.cache.to_json()}


def _tokens() -> list[TensorSpec]:
    return [TensorSpec(INPUT_IDS, "int64", ("batch", "seq")), TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
            TensorSpec(ATTENTION_MASK, "int64", ("batch", "total_seq"))]


def decoder_contract(cfg: ModelConfig, hidden_states: bool = False) -> GraphContract:
    """The decoder graph's inputs and outputs (symbolic dims)."""
    L = cfg.latent_dim
    inputs = _tokens() + [TensorSpec(past_name(i), "float32", ("batch", "past_seq", L))
                          for i in range(cfg.num_hidden_layers)]
    outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", cfg.vocab_size))]
    outputs += [TensorSpec(present_name(i), "float32", ("batch", "total_seq", L)) for i in range(cfg.num_hidden_layers)]
    if hidden_states:
        outputs.append(TensorSpec(HIDDEN_STATES, "float32", ("batch", "seq", cfg.hidden_size)))
    return GraphContract(tuple(inputs), tuple(outputs), CacheSpec(CACHE_LAYOUT, L))


def mtp_contract(cfg: ModelConfig) -> GraphContract:
    L, D, V = cfg.latent_dim, cfg.hidden_size, cfg.vocab_size
    inputs = [TensorSpec(HIDDEN_STATES, "float32", ("batch", "seq", D))] + _tokens() + [
        TensorSpec(MTP_PAST, "float32", ("batch", "past_seq", L))]
    outputs = [TensorSpec(LOGITS, "float32", ("batch", "seq", V)),
               TensorSpec(MTP_PRESENT, "float32", ("batch", "total_seq", L))]
    return GraphContract(tuple(inputs), tuple(outputs),
                         CacheSpec("the MTP block's own latent, as the decoder's layers (one layer)", L))
