"""The model configuration dsexport understands, read from a Hugging Face config.json.

One dataclass for DeepSeek-V2 and -V3: they differ only in values (routing method, rope layout,
scoring function), never in structure. Reading is strict where a wrong guess would give a
silently different model (a `rope_theta` of 0 is an error, not 10000; 2.7 layers is an error, not
2), and lenient about keys that do not change the computation. The same checks run on the copy a
bundle's manifest carries (`ModelConfig.from_json`), so a tampered manifest is refused the same way.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .errors import BundleError, CheckpointError, UserError
from .jsonio import Fields, load_json

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "yarn")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

# Bounds on dimensions: far above any released DeepSeek model (V3: 61 layers, hidden 7168, vocab
# 129280, 256 experts), low enough that arithmetic on a hostile value cannot run away.
MAX_LAYERS = 1024
MAX_DIM = 1 << 17
MAX_VOCAB = 1 << 22
MAX_EXPERTS = 1 << 14
MAX_POSITIONS = 1 << 24

# Architectures that share a model_type or a name with DeepSeek but compute something different.
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

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def expert_ids(self, layer: int) -> tuple[int, ...]:
        """Original ids of the routed experts this layer holds, in order."""
        if not self.is_moe_layer(layer):
            return ()
        if self.kept_experts is not None and layer < len(self.kept_experts):  # (the MTP layer comes after)
            return self.kept_experts[layer]
        return tuple(range(self.n_routed_experts))

    def num_experts(self, layer: int) -> int:
        return len(self.expert_ids(layer))

    @property
    def group_size(self) -> int:
        return self.n_routed_experts // self.n_group

    def expert_groups(self, layer: int) -> tuple[int, ...]:
        """The routing group of each expert the layer holds (groups keep their original ids)."""
        return tuple(e // self.group_size for e in self.expert_ids(layer))

    def routable(self, ids) -> bool:
        """Whether top-k stays well defined with only these original expert ids: at least k of them,
        and under group-limited routing, the topk_group smallest non-empty groups (the worst choice
        the router can make) still hold k experts together."""
        k = self.num_experts_per_tok
        if len(ids) < k:
            return False
        if not self.grouped_routing:
            return True
        counts = sorted(c for c in (sum(1 for e in ids if e // self.group_size == g) for g in range(self.n_group)) if c)
        return sum(counts[: self.topk_group]) >= k

    @property
    def grouped_routing(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group

    def with_kept_experts(self, kept: dict[int, list[int]] | None, error: type[UserError] = UserError) -> "ModelConfig":
        """This config with only the given original expert ids in the given MoE layers."""
        if not kept:
            return self
        per_layer = []
        for layer in range(self.num_hidden_layers):
            ids = tuple(sorted(kept.get(layer, self.expert_ids(layer)))) if self.is_moe_layer(layer) else ()
            if self.is_moe_layer(layer):
                _check_kept(self, layer, ids, error)
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

    def unpruned(self) -> "ModelConfig":
        return dataclasses.replace(self, kept_experts=None)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.kept_experts is not None:
            out["kept_experts"] = [list(ids) for ids in self.kept_experts]
        return out

    @classmethod
    def from_json(cls, data: Any, file: str = "manifest.json", error: type[UserError] = BundleError,
                  path: str = "model") -> "ModelConfig":
        """The model section of a manifest (to_json's layout), every value checked."""
        return _read_model(Fields(data, file, error, path))


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


# ---- reading config.json ------------------------------------------------------------------
def _read_rope(raw: Fields) -> RopeConfig:
    # Official DeepSeek configs: top-level rope_theta + rope_scaling{type: yarn, ...}.
    # Configs written by transformers 5: rope_parameters{rope_type, rope_theta, ...}.
    key = "rope_parameters" if raw.has("rope_parameters") else "rope_scaling"
    params = raw.obj(key, None) or Fields({}, raw.file, raw.error, key)
    if any(isinstance(v, dict) for v in params.data.values()):
        raw.fail("per-layer-type rope parameters are not a DeepSeek-V2/V3 layout", key)
    rope_type = params.str("rope_type", None) or params.str("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        params.fail(f"rope type {rope_type!r} is not supported (DeepSeek-V2/V3 use 'default' or 'yarn')")
    theta_source = params if params.has("rope_theta") else raw
    theta = theta_source.float("rope_theta", 10000.0, lo=0.0, lo_open=True, hi=1e12)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    max_pos = raw.int("max_position_embeddings", 4096, lo=1, hi=MAX_POSITIONS)
    orig_source = params if params.has("original_max_position_embeddings") else raw
    orig = orig_source.int("original_max_position_embeddings", max_pos, lo=1, hi=MAX_POSITIONS)
    factor = params.float("factor", None, lo=0.0, lo_open=True, hi=1e6)
    return RopeConfig(
        theta=theta, type="yarn", factor=factor if factor is not None else max_pos / orig,
        original_max_position_embeddings=orig,
        beta_fast=params.float("beta_fast", 32.0, lo=0.0, lo_open=True, hi=1e6),
        beta_slow=params.float("beta_slow", 1.0, lo=0.0, lo_open=True, hi=1e6),
        mscale=params.float("mscale", None, lo=0.0, hi=1e3),
        mscale_all_dim=params.float("mscale_all_dim", None, lo=0.0, hi=1e3),
        attention_factor=params.float("attention_factor", None, lo=0.0, lo_open=True, hi=1e3),
        truncate=_flag(params, "truncate", True),
    )


def _flag(f: Fields, key: str, default: bool) -> bool:
    """A boolean config flag; 0 and 1 are accepted as configs sometimes write them."""
    value = f.raw(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    f.fail(f"expected true or false, got {value!r}"[:200], key)


def _routing(raw: Fields, is_v3: bool) -> tuple[str, str, bool]:
    if is_v3:
        # transformers' V3 always routes with sigmoid scores, a correction bias and group top-2 sums;
        # DeepSeek's V3 configs say so with scoring_func=sigmoid, topk_method=noaux_tc.
        scoring, method = raw.str("scoring_func", "sigmoid"), raw.str("topk_method", "noaux_tc")
        if (scoring, method) != ("sigmoid", "noaux_tc"):
            raise CheckpointError(f"config.json: deepseek_v3 with scoring_func={scoring!r}, topk_method={method!r} "
                                  "is not supported (expected sigmoid + noaux_tc)")
        return scoring, method, _flag(raw, "norm_topk_prob", True)
    scoring, method = raw.str("scoring_func", "softmax"), raw.str("topk_method", "greedy")
    if scoring != "softmax" or method not in ("greedy", "group_limited_greedy"):
        raise CheckpointError(f"config.json: deepseek_v2 with scoring_func={scoring!r}, topk_method={method!r} "
                              "is not supported (expected softmax with greedy or group_limited_greedy)")
    # DeepSeek's own V2 code normalizes when norm_topk_prob is set; transformers ignores the flag.
    # We follow DeepSeek (official V2 configs set it false, where both agree).
    return scoring, method, _flag(raw, "norm_topk_prob", False)


def _refuse_unsupported(raw: dict) -> str:
    model_type = raw.get("model_type")
    for marker, what in _REFUSED_MARKERS.items():
        if marker in raw:
            raise CheckpointError(
                f"config.json describes {what}, which dsexport does not support; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2, V2-Lite, V2.5, V3, R1 and compatible)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        what = _REFUSED_MODEL_TYPES.get(model_type, f"model_type {str(model_type)[:60]!r}")
        raise CheckpointError(f"unsupported architecture: {what}; supported model types: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise CheckpointError(f"config.json: hidden_act {str(hidden_act)[:40]!r} is not supported (DeepSeek uses 'silu')")
    if raw.get("moe_layer_freq", 1) != 1:
        raise CheckpointError(f"config.json: moe_layer_freq={raw.get('moe_layer_freq')!r} is not supported (only 1)")
    return model_type


def _token_ids(raw: Fields, vocab: int) -> tuple[int | None, tuple[int, ...]]:
    bos = raw.int("bos_token_id", None, lo=0, hi=vocab - 1)
    eos = raw.raw("eos_token_id", None)
    if eos is None:
        return bos, ()
    if isinstance(eos, list):
        return bos, raw.ints("eos_token_id", lo=0, hi=vocab - 1, max_len=256)
    return bos, (raw.int("eos_token_id", lo=0, hi=vocab - 1),)


def parse_config(raw_dict: dict[str, Any], file: str = "config.json") -> ModelConfig:
    """Turn a config.json dict into a ModelConfig, refusing what dsexport cannot compute exactly."""
    if not isinstance(raw_dict, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    model_type = _refuse_unsupported(raw_dict)
    is_v3 = model_type == "deepseek_v3"
    raw = Fields(raw_dict, file, CheckpointError)
    # num_key_value_heads is not read: MLA expands the latent to every attention head.
    scoring_func, topk_method, norm_topk_prob = _routing(raw, is_v3)
    vocab = raw.int("vocab_size", lo=1, hi=MAX_VOCAB)
    n_routed = raw.int("n_routed_experts", 0, lo=0, hi=MAX_EXPERTS) or 0
    n_group = raw.int("n_group", None, lo=1, hi=MAX_EXPERTS) or 1
    topk_group = raw.int("topk_group", None, lo=1, hi=MAX_EXPERTS) or n_group
    if topk_method == "greedy":
        n_group, topk_group = 1, 1
    bos, eos_ids = _token_ids(raw, vocab)
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=raw.int("hidden_size", lo=1, hi=MAX_DIM),
        intermediate_size=raw.int("intermediate_size", lo=1, hi=MAX_DIM * 8),
        num_hidden_layers=raw.int("num_hidden_layers", lo=1, hi=MAX_LAYERS),
        num_attention_heads=raw.int("num_attention_heads", lo=1, hi=4096),
        kv_lora_rank=raw.int("kv_lora_rank", lo=1, hi=MAX_DIM),
        qk_nope_head_dim=raw.int("qk_nope_head_dim", lo=1, hi=MAX_DIM),
        qk_rope_head_dim=raw.int("qk_rope_head_dim", lo=2, hi=MAX_DIM),
        v_head_dim=raw.int("v_head_dim", lo=1, hi=MAX_DIM),
        q_lora_rank=raw.int("q_lora_rank", None, lo=1, hi=MAX_DIM),
        n_routed_experts=n_routed,
        n_shared_experts=raw.int("n_shared_experts", 0, lo=0, hi=MAX_EXPERTS) or 0,
        num_experts_per_tok=raw.int("num_experts_per_tok", 0, lo=0, hi=MAX_EXPERTS) or 0,
        moe_intermediate_size=raw.int("moe_intermediate_size", 0, lo=0, hi=MAX_DIM * 8) or 0,
        first_k_dense_replace=raw.int("first_k_dense_replace", 0, lo=0, hi=MAX_LAYERS),
        scoring_func=scoring_func, topk_method=topk_method, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=raw.float("routed_scaling_factor", 1.0, lo=0.0, lo_open=True, hi=1e6),
        rms_norm_eps=raw.float("rms_norm_eps", 1e-6, lo=0.0, lo_open=True, hi=1.0),
        rope=_read_rope(raw),
        # V2 always rotates interleaved pairs (complex multiply); V3 says so with rope_interleave.
        rope_interleave=_flag(raw, "rope_interleave", True) if is_v3 else True,
        max_position_embeddings=raw.int("max_position_embeddings", 4096, lo=2, hi=MAX_POSITIONS),
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", False),
        attention_bias=_flag(raw, "attention_bias", False),
        bos_token_id=bos, eos_token_ids=eos_ids,
        num_nextn_predict_layers=raw.int("num_nextn_predict_layers", 0, lo=0, hi=16) or 0,
        # Written by `dsexport distill` for a pruned student: the checkpoint keeps every expert's
        # weights (and the original shapes), and these lists say which ones the model uses.
        kept_experts=raw.int_lists("kept_experts", None, lo=0, hi=MAX_EXPERTS - 1, max_len=MAX_EXPERTS),
    )
    check_consistency(cfg, CheckpointError, file)
    return cfg


def check_consistency(cfg: ModelConfig, error: type[UserError], file: str) -> None:
    """What no single value shows: the rope dim splits in halves, top-k fits the experts and the
    groups, group counts divide the experts, kept experts are well-defined per layer."""
    def fail(message: str):
        raise error(f"{file}: {message}")

    if cfg.qk_rope_head_dim % 2:
        fail(f"qk_rope_head_dim={cfg.qk_rope_head_dim} is odd; rope rotates pairs")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        fail(f"first_k_dense_replace={cfg.first_k_dense_replace} exceeds num_hidden_layers={cfg.num_hidden_layers}")
    if cfg.n_routed_experts:
        if not 1 <= cfg.num_experts_per_tok <= cfg.n_routed_experts:
            fail(f"num_experts_per_tok={cfg.num_experts_per_tok} must be between 1 and n_routed_experts="
                 f"{cfg.n_routed_experts}")
        if cfg.moe_intermediate_size < 1:
            fail("moe_intermediate_size must be at least 1 in a model with routed experts")
        if cfg.n_routed_experts % cfg.n_group:
            fail(f"n_routed_experts={cfg.n_routed_experts} is not divisible by n_group={cfg.n_group}")
        if cfg.topk_group > cfg.n_group:
            fail(f"topk_group={cfg.topk_group} exceeds n_group={cfg.n_group}")
        if cfg.topk_group * cfg.group_size < cfg.num_experts_per_tok:
            fail(f"topk_group={cfg.topk_group} groups of {cfg.group_size} experts hold fewer than "
                 f"num_experts_per_tok={cfg.num_experts_per_tok}")
    if cfg.rope.type == "yarn" and cfg.rope.factor < 1:
        fail(f"YaRN factor {cfg.rope.factor:g} is below 1")
    if cfg.kept_experts is not None:
        if len(cfg.kept_experts) != cfg.num_hidden_layers:
            fail(f"kept_experts lists {len(cfg.kept_experts)} layers; the model has {cfg.num_hidden_layers}")
        for layer, ids in enumerate(cfg.kept_experts):
            if cfg.is_moe_layer(layer):
                _check_kept(cfg, layer, tuple(ids), error, f"{file}: kept_experts[{layer}]")
            elif ids:
                fail(f"kept_experts[{layer}]: layer {layer} is dense and holds no routed experts")


def _check_kept(cfg: ModelConfig, layer: int, ids: tuple[int, ...], error: type[UserError], file: str = "") -> None:
    prefix = f"{file}: " if file else ""
    k = cfg.num_experts_per_tok
    if len(ids) < k or len(set(ids)) != len(ids):
        raise error(f"{prefix}layer {layer}: keeping {len(ids)} experts; need at least top-k = {k} distinct ones")
    if not all(0 <= e < cfg.n_routed_experts for e in ids):
        raise error(f"{prefix}layer {layer}: expert ids must lie in 0..{cfg.n_routed_experts - 1}")
    if list(ids) != sorted(ids):
        raise error(f"{prefix}layer {layer}: kept expert ids must be in ascending order")
    if not cfg.routable(ids):
        raise error(f"{prefix}layer {layer}: keeping experts {list(ids)} leaves some choice of {cfg.topk_group} "
                    f"routing groups with fewer than top-k = {k} experts")


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a Hugging Face checkpoint directory has a config.json)")
    raw = load_json(path, CheckpointError, max_bytes=4 << 20)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return parse_config(raw, str(path))


# ---- reading a manifest's model section ---------------------------------------------------
def _read_model(f: Fields) -> ModelConfig:
    r = f.obj("rope")
    rope = RopeConfig(
        theta=r.float("theta", lo=0.0, lo_open=True, hi=1e12), type=r.str("type", choices=ROPE_TYPES),
        factor=r.float("factor", 1.0, lo=0.0, lo_open=True, hi=1e6),
        original_max_position_embeddings=r.int("original_max_position_embeddings", 4096, lo=1, hi=MAX_POSITIONS),
        beta_fast=r.float("beta_fast", 32.0, lo=0.0, hi=1e6), beta_slow=r.float("beta_slow", 1.0, lo=0.0, hi=1e6),
        mscale=r.float("mscale", None, lo=0.0, hi=1e3), mscale_all_dim=r.float("mscale_all_dim", None, lo=0.0, hi=1e3),
        attention_factor=r.float("attention_factor", None, lo=0.0, hi=1e3), truncate=r.bool("truncate", True))
    vocab = f.int("vocab_size", lo=1, hi=MAX_VOCAB)
    layers = f.int("num_hidden_layers", lo=1, hi=MAX_LAYERS)
    kept = f.int_lists("kept_experts", None, lo=0, hi=MAX_EXPERTS - 1, max_len=MAX_EXPERTS)
    cfg = ModelConfig(
        model_type=f.str("model_type", choices=SUPPORTED_MODEL_TYPES), vocab_size=vocab,
        hidden_size=f.int("hidden_size", lo=1, hi=MAX_DIM), intermediate_size=f.int("intermediate_size", lo=1, hi=MAX_DIM * 8),
        num_hidden_layers=layers, num_attention_heads=f.int("num_attention_heads", lo=1, hi=4096),
        kv_lora_rank=f.int("kv_lora_rank", lo=1, hi=MAX_DIM), qk_nope_head_dim=f.int("qk_nope_head_dim", lo=1, hi=MAX_DIM),
        qk_rope_head_dim=f.int("qk_rope_head_dim", lo=2, hi=MAX_DIM), v_head_dim=f.int("v_head_dim", lo=1, hi=MAX_DIM),
        q_lora_rank=f.int("q_lora_rank", None, lo=1, hi=MAX_DIM),
        n_routed_experts=f.int("n_routed_experts", lo=0, hi=MAX_EXPERTS),
        n_shared_experts=f.int("n_shared_experts", lo=0, hi=MAX_EXPERTS),
        num_experts_per_tok=f.int("num_experts_per_tok", lo=0, hi=MAX_EXPERTS),
        moe_intermediate_size=f.int("moe_intermediate_size", lo=0, hi=MAX_DIM * 8),
        first_k_dense_replace=f.int("first_k_dense_replace", lo=0, hi=MAX_LAYERS),
        scoring_func=f.str("scoring_func", choices=SCORING_FUNCS), topk_method=f.str("topk_method", choices=TOPK_METHODS),
        n_group=f.int("n_group", lo=1, hi=MAX_EXPERTS), topk_group=f.int("topk_group", lo=1, hi=MAX_EXPERTS),
        norm_topk_prob=f.bool("norm_topk_prob"),
        routed_scaling_factor=f.float("routed_scaling_factor", lo=0.0, lo_open=True, hi=1e6),
        rms_norm_eps=f.float("rms_norm_eps", lo=0.0, lo_open=True, hi=1.0), rope=rope,
        rope_interleave=f.bool("rope_interleave"),
        max_position_embeddings=f.int("max_position_embeddings", lo=2, hi=MAX_POSITIONS),
        tie_word_embeddings=f.bool("tie_word_embeddings"), attention_bias=f.bool("attention_bias"),
        bos_token_id=f.int("bos_token_id", None, lo=0, hi=vocab - 1),
        eos_token_ids=f.ints("eos_token_ids", lo=0, hi=vocab - 1, max_len=256),
        num_nextn_predict_layers=f.int("num_nextn_predict_layers", 0, lo=0, hi=16), kept_experts=kept)
    check_consistency(cfg, f.error, f"{f.file}: {f.path}")
    return cfg


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
