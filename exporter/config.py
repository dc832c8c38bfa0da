"""The model configuration dsexport understands, read from a Hugging Face config.json.

One dataclass for DeepSeek-V2 and -V3: they differ only in values (routing method, rope layout,
scoring function), never in structure. Reading is strict where a wrong guess would give a
silently different model, and lenient about keys that do not change the computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from dsexport.errors import CheckpointError, UserError

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# Architectures that share a model_type or a name with DeepSeek but compute something different.
# Each maps to the reason shown to the user.
_REFUSED_MARKERS = {
    "index_topk": "DeepSeek-V3.2 sparse attention (DSA lightning indexer)",
    "index_n_heads": "DeepSeek-V3.2 sparse attention (DSA lightning indexer)",
}
_REFUSED_MODEL_TYPES = {
    "deepseek_v32": "DeepSeek-V3.2 sparse attention (DSA lightning indexer)",
    "deepseek": "DeepSeek-MoE v1 (no multi-head latent attention)",
    "kimi_k2": "a model_type dsexport has not checked",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # YaRN cos/sin scale; derived when None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None
    # MoE
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    scoring_func: str  # "softmax" | "sigmoid"
    topk_method: str  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # the rest
    rms_norm_eps: float
    rope: RopeConfig
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    num_nextn_predict_layers: int = 0
    # Original ids of the routed experts kept in each layer (None: all of them; () for dense
    # layers). Pruning sets it; counts may then differ per layer and groups become uneven.
    kept_experts: tuple[tuple[int, ...], ...] | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token per layer in the KV cache: the compressed latent plus the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    def expert_ids(self, layer: int) -> tuple[int, ...]:
        """Original ids of the routed experts this layer holds, in order."""
        if not self.is_moe_layer(layer):
            return ()
        if self.kept_experts is not None and layer < len(self.kept_experts):  # (the MTP layer comes after)
            return self.kept_experts[layer]
        return tuple(range(self.n_routed_experts))

    def num_experts(self, layer: int) -> int:
        return len(self.expert_ids(layer))

    def expert_groups(self, layer: int) -> tuple[int, ...]:
        """The routing group of each expert the layer holds (groups keep their original ids)."""
        size = self.n_routed_experts // self.n_group
        return tuple(e // size for e in self.expert_ids(layer))

    def routable(self, ids) -> bool:
        """Whether top-k stays well defined with only these original expert ids: at least k of them,
        and under group-limited routing, the topk_group smallest non-empty groups (the worst choice
        the router can make) still hold k experts together."""
        k = self.num_experts_per_tok
        if len(ids) < k:
            return False
        if not self.grouped_routing:
            return True
        size = self.n_routed_experts // self.n_group
        counts = sorted(c for c in (sum(1 for e in ids if e // size == g) for g in range(self.n_group)) if c)
        return sum(counts[: self.topk_group]) >= k

    @property
    def grouped_routing(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group

    def with_kept_experts(self, kept: dict[int, list[int]] | None) -> "ModelConfig":
        """This config with only the given original expert ids in the given MoE layers."""
        if not kept:
            return self
        per_layer = []
        for layer in range(self.num_hidden_layers):
            ids = tuple(sorted(kept.get(layer, self.expert_ids(layer)))) if self.is_moe_layer(layer) else ()
            if self.is_moe_layer(layer):
                if len(ids) < self.num_experts_per_tok or len(set(ids)) != len(ids):
                    raise UserError(f"layer {layer}: keeping {len(ids)} experts; need at least top-k = "
                                    f"{self.num_experts_per_tok} distinct ones")
                if not all(0 <= e < self.n_routed_experts for e in ids):
                    raise UserError(f"layer {layer}: expert ids must lie in 0..{self.n_routed_experts - 1}")
                if not self.routable(ids):
                    raise UserError(f"layer {layer}: keeping experts {list(ids)} leaves some choice of "
                                    f"{self.topk_group} routing groups with fewer than top-k = "
                                    f"{self.num_experts_per_tok} experts")
            per_layer.append(ids)
        return dataclasses.replace(self, kept_experts=tuple(per_layer))

    @property
    def uses_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek applies it."""
        scale = self.qk_head_dim**-0.5
        r = self.rope
        if r.type == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        if data.get("kept_experts") is not None:
            data["kept_experts"] = tuple(tuple(ids) for ids in data["kept_experts"])
        return cls(**data)


def group_table(groups: tuple[int, ...], n_group: int) -> tuple[list[list[int]], bool]:
    """Expert slots of each routing group, padded with the sentinel slot len(groups).

    Returns ([n_group][max group size] slot indices, whether any padding was needed). After
    pruning, groups may be uneven or empty; unpruned, this is a plain reshape.
    """
    members: list[list[int]] = [[] for _ in range(n_group)]
    for slot, group in enumerate(groups):
        members[group].append(slot)
    width = max(len(m) for m in members)
    padded = any(len(m) < width for m in members)
    return [m + [len(groups)] * (width - len(m)) for m in members], padded


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _read_rope(raw: dict[str, Any]) -> RopeConfig:
    # Official DeepSeek configs: top-level rope_theta + rope_scaling{type: yarn, ...}.
    # Configs written by transformers 5: rope_parameters{rope_type, rope_theta, ...}.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("config.json: per-layer-type rope parameters are not a DeepSeek-V2/V3 layout")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta") or raw.get("rope_theta") or 10000.0
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "yarn":
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (DeepSeek-V2/V3 use 'default' or 'yarn')"
        )
    max_pos = int(raw.get("max_position_embeddings", 4096))
    orig = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _require(raw: dict[str, Any], key: str) -> Any:
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"config.json: required key {key!r} is missing")
    return raw[key]


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Turn a config.json dict into a ModelConfig, refusing what dsexport cannot compute exactly."""
    model_type = raw.get("model_type")
    for marker, what in _REFUSED_MARKERS.items():
        if marker in raw:
            raise CheckpointError(
                f"config.json describes {what}, which dsexport does not support; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2, V2-Lite, V2.5, V3, R1 and compatible)"
            )
    if model_type not in SUPPORTED_MODEL_TYPES:
        what = _REFUSED_MODEL_TYPES.get(model_type, f"model_type {model_type!r}")
        raise CheckpointError(
            f"unsupported architecture: {what}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    is_v3 = model_type == "deepseek_v3"

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise CheckpointError(f"config.json: hidden_act {hidden_act!r} is not supported (DeepSeek uses 'silu')")
    moe_layer_freq = raw.get("moe_layer_freq", 1)
    if moe_layer_freq != 1:
        raise CheckpointError(f"config.json: moe_layer_freq={moe_layer_freq} is not supported (only 1)")
    # num_key_value_heads is not read: MLA expands the latent to every attention head.
    n_heads = int(_require(raw, "num_attention_heads"))

    n_routed = int(raw.get("n_routed_experts") or 0)
    if is_v3:
        # transformers' V3 always routes with sigmoid scores, a correction bias and group top-2 sums;
        # DeepSeek's V3 configs say so with scoring_func=sigmoid, topk_method=noaux_tc.
        scoring_func = raw.get("scoring_func", "sigmoid")
        topk_method = raw.get("topk_method", "noaux_tc")
        if scoring_func != "sigmoid" or topk_method != "noaux_tc":
            raise CheckpointError(
                f"config.json: deepseek_v3 with scoring_func={scoring_func!r}, topk_method={topk_method!r} "
                "is not supported (expected sigmoid + noaux_tc)"
            )
        norm_topk_prob = bool(raw.get("norm_topk_prob", True))
    else:
        scoring_func = raw.get("scoring_func", "softmax")
        topk_method = raw.get("topk_method", "greedy")
        if scoring_func != "softmax" or topk_method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(
                f"config.json: deepseek_v2 with scoring_func={scoring_func!r}, topk_method={topk_method!r} "
                "is not supported (expected softmax with greedy or group_limited_greedy)"
            )
        # DeepSeek's own V2 code normalizes when norm_topk_prob is set; transformers ignores the flag.
        # We follow DeepSeek (official V2 configs set it false, where both agree).
        norm_topk_prob = bool(raw.get("norm_topk_prob", False))

    n_group = raw.get("n_group") or 1
    topk_group = raw.get("topk_group") or n_group
    if topk_method == "greedy":
        n_group, topk_group = 1, 1
    if n_routed and n_routed % n_group:
        raise CheckpointError(f"config.json: n_routed_experts={n_routed} is not divisible by n_group={n_group}")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=int(_require(raw, "hidden_size")),
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_hidden_layers=int(_require(raw, "num_hidden_layers")),
        num_attention_heads=n_heads,
        kv_lora_rank=int(_require(raw, "kv_lora_rank")),
        qk_nope_head_dim=int(_require(raw, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_require(raw, "qk_rope_head_dim")),
        v_head_dim=int(_require(raw, "v_head_dim")),
        q_lora_rank=raw.get("q_lora_rank"),
        n_routed_experts=n_routed,
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
        scoring_func=scoring_func,
        topk_method=topk_method,
        n_group=int(n_group),
        topk_group=int(topk_group),
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_read_rope(raw),
        # V2 always rotates interleaved pairs (complex multiply); V3 says so with rope_interleave.
        rope_interleave=bool(raw.get("rope_interleave", True)) if is_v3 else True,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
    )


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a Hugging Face checkpoint directory has a config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return parse_config(raw)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters a decoded token reads): the latter counts the k routed
    experts a token runs and every other weight, except the embedding table, of which a token
    reads one row (with tied embeddings the table is read whole, as the output head)."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = D * H * (dn + dr) if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr)
    attention = q + D * (r + dr) + r + r * H * (dn + dv) + H * dv * D + 2 * D
    total = V * D * (1 if cfg.tie_word_embeddings else 2) + D
    active = V * D + D  # the output head and the final norm
    for layer in range(cfg.num_hidden_layers):
        total += attention
        active += attention
        if not cfg.is_moe_layer(layer):
            total += 3 * D * cfg.intermediate_size
            active += 3 * D * cfg.intermediate_size
            continue
        E, expert = cfg.num_experts(layer), 3 * D * cfg.moe_intermediate_size
        shared = cfg.n_shared_experts * expert + E * D + (E if cfg.uses_correction_bias else 0)
        total += shared + E * expert
        active += shared + cfg.num_experts_per_tok * expert
    return total, active


def weight_bytes(cfg: ModelConfig, bits: dict[str, int], block_size: int = 32,
                 scale_bytes: int = 4, expert_block_size: int | None = None, per_channel_bits: tuple[int, ...] = (),
                 zero_points: bool = False) -> tuple[int, int]:
    """(bytes of all weights, bytes a decoded token reads) when the parts in `bits` (see
    exporter/quantize.py: PARTS) are block-quantized and everything else is fp32: embeddings,
    router, norms, the absorbed kv_b_proj. per_channel_bits: widths with one scale per row
    (counted as rows of hidden_size); zero_points: a zero point of `bits` per block."""
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def size(part: str, n: int) -> float:
        b = bits.get(part)
        if b is None:
            return 4.0 * n
        block = D if b in per_channel_bits else expert_block_size or block_size if part == "routed_experts" else block_size
        return n * (b / 8 + (scale_bytes + (b / 8 if zero_points else 0)) / block)

    q = D * H * (dn + dr) if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr)
    attention = size("attention", q + D * (r + dr) + H * dv * D) + 4.0 * (r * H * (dn + dv) + 2 * D + r
                                                                         + (cfg.q_lora_rank or 0))
    head = size("lm_head", V * D)
    tied_fp32 = cfg.tie_word_embeddings and "lm_head" not in bits
    total = 4.0 * V * D + (0 if tied_fp32 else head) + 4 * D
    active = (4.0 * V * D if tied_fp32 else head) + 4 * D
    for layer in range(cfg.num_hidden_layers):
        total += attention
        active += attention
        if not cfg.is_moe_layer(layer):
            dense = size("dense_mlp", 3 * D * cfg.intermediate_size)
            total += dense
            active += dense
            continue
        E, expert = cfg.num_experts(layer), 3 * D * cfg.moe_intermediate_size
        shared = size("shared_experts", cfg.n_shared_experts * expert) + 4.0 * (E * D + (E if cfg.uses_correction_bias else 0))
        total += shared + size("routed_experts", E * expert)
        active += shared + size("routed_experts", cfg.num_experts_per_tok * expert)
    return int(total), int(active)
