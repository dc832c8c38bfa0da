"""Will the model fit the target? Weights, latent KV cache, activations, runtime overhead.

A plan is arithmetic on the model configuration and the target's profile, made before any
work: what the bundle will need, whether it fits in the usable memory and by how much, what
would make it fit, and a decode speed estimate from bandwidth (an estimate, labelled so).
"""

from __future__ import annotations

import dataclasses

from dsexport.core.config import ModelConfig, parameter_counts
from dsexport.core.quant import QuantSpec, expert_bytes, weight_bytes

from .quantization import preset_spec
from .registry import Target

# Bytes per weight of precisions without a QuantSpec (TensorRT fp16/bf16 engines, Thor's fp8/fp4,
# planned only), and a rough figure of the quantized presets for ordering them; a plan of an
# int8/int4 bundle counts its QuantSpec's real bytes (core/quant.py: weight_bytes).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32,
                    "fp4": 0.5 + 1 / 16}
PRESET = "preset"  # plan_memory's default: the target's spec for the precision with default flags
# ORT format (phones) is one flatbuffer with every weight embedded: 32-bit offsets cap it
# (exporter/ort_mobile.py; onnxruntime 1.32 cannot put weights outside it).
FORMAT_LIMIT_BYTES = {"onnxruntime-mobile": 2**31 - 1}
RUNTIME_OVERHEAD = {"onnxruntime": 0.2e9, "tensorrt": 0.6e9, "onnxruntime-mobile": 0.1e9}  # libraries, CUDA context
PREFILL_CHUNK = 512  # tokens per prefill step the activation estimate assumes
MEASURED_ROOFLINE = 0.55  # fraction of bandwidth dsexport's fp32 decode reaches on x86 (docs/performance.md)
# Backends that cannot keep routed experts outside their graphs, and why (docs/paging.md).
CANNOT_PAGE = {
    "tensorrt": "TensorRT engines cannot page: an engine holds every weight on the device, experts included",
    "onnxruntime-mobile": "phones run one .ort file with every weight inside; paged segment graphs are not "
                          "converted to ORT format yet",
}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    target: str
    precision: str
    context: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    usable_bytes: int | None
    decode_bytes_per_token: int
    bandwidth_gbs: float | None
    format_limit_bytes: int | None = None  # the model file's own size cap, where the format has one

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        if self.format_limit_bytes is not None and self.weights_bytes > self.format_limit_bytes:
            return False
        return None if self.usable_bytes is None else self.total_bytes <= self.usable_bytes

    @property
    def margin_bytes(self) -> int | None:
        return None if self.usable_bytes is None else self.usable_bytes - self.total_bytes

    def decode_estimate(self) -> dict | None:
        """Tokens/s bounds from bandwidth: an estimate, not a measurement."""
        if not self.bandwidth_gbs:
            return None
        ceiling = self.bandwidth_gbs * 1e9 / self.decode_bytes_per_token
        return {"roofline_tokens_per_s": ceiling, "at_measured_fraction": ceiling * MEASURED_ROOFLINE,
                "measured_fraction": MEASURED_ROOFLINE, "label": "estimate from bandwidth, not measured"}

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits,
                "margin_bytes": self.margin_bytes, "decode_estimate": self.decode_estimate()}


def model_bytes(cfg: ModelConfig, target: Target, precision: str, quant: QuantSpec | None) -> tuple[int, int]:
    """(weight bytes, bytes a decoded token reads): a quantized bundle at its spec's real bytes
    (as ONNX Runtime holds them after repacking, on ONNX Runtime targets), else bytes per weight."""
    if quant is not None:
        return weight_bytes(cfg, quant, resident=target.backend != "tensorrt")
    total, active = parameter_counts(cfg)
    per_weight = BYTES_PER_WEIGHT[precision]
    return int(total * per_weight), int(active * per_weight)


def plan_memory(cfg: ModelConfig, target: Target, precision: str, context: int, batch: int = 1,
                quant: QuantSpec | None | str = PRESET) -> MemoryPlan:
    """The plan for a bundle of `cfg` (its kept experts) at `quant` (default: the target's preset
    for the precision)."""
    if quant == PRESET:
        quant = preset_spec(target, precision)
    weights, decode_bytes = model_bytes(cfg, target, precision, quant)
    cache_dtype = 4 if precision == "fp32" else 2
    kv = cfg.latent_dim * cfg.num_hidden_layers * context * batch * cache_dtype
    t = min(PREFILL_CHUNK, context) * batch
    inter = max(cfg.intermediate_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size * 2)
    activations = 4 * (t * cfg.vocab_size + cfg.num_attention_heads * t * context + 3 * t * inter
                       + 8 * t * cfg.hidden_size)
    if target.prefill_moe_lowering == "dense":  # every expert on every prompt token of a chunk
        from .tensorrt_plan import prefill_tokens

        chunk = min(prefill_tokens(cfg, target, precision), context) * batch
        experts = max((cfg.num_experts(i) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), default=0)
        activations += experts * chunk * (2 * cfg.moe_intermediate_size + cfg.hidden_size) * (4 if precision == "fp32" else 2)
    device = target.device
    return MemoryPlan(
        target=target.name, precision=precision, context=context, weights_bytes=weights,
        kv_cache_bytes=int(kv), activation_bytes=int(activations),
        overhead_bytes=int(RUNTIME_OVERHEAD.get(target.backend, 0.2e9)),
        usable_bytes=int(device.usable_gb * 1e9) if device else None,
        decode_bytes_per_token=decode_bytes, bandwidth_gbs=device.bandwidth_gbs if device else None,
        format_limit_bytes=FORMAT_LIMIT_BYTES.get(target.backend),
    )


def routed_expert_bytes(cfg: ModelConfig, quant: QuantSpec | None) -> int:
    """Bytes of every routed expert the config keeps, at the spec's widths."""
    return int(sum(expert_bytes(cfg, quant, i, e) for i in cfg.moe_layers for e in cfg.expert_ids(i)))


def paging_plan(cfg: ModelConfig, target: Target, plan: MemoryPlan, quant: QuantSpec | None | str = PRESET) -> dict:
    """Expert paging on this target: can its backend page, and what expert cache the usable memory
    leaves once everything else (non-expert weights, cache, activations, overhead) is resident.
    It fits when the cache holds at least one token's routed experts in every MoE layer. The store
    holds routed experts at the spec's width (exporter/paged.py)."""
    reason = CANNOT_PAGE.get(target.backend)
    if reason:
        return {"can_page": False, "reason": reason}
    if quant == PRESET:
        quant = preset_spec(target, plan.precision)
    store = routed_expert_bytes(cfg, quant)
    resident_experts = int(sum(expert_bytes(cfg, quant, i, e, resident=True) for i in cfg.moe_layers
                               for e in cfg.expert_ids(i)))
    bits = quant.bits.get("routed_experts") if quant is not None else None
    largest = max((expert_bytes(cfg, quant, i, e) for i in cfg.moe_layers for e in cfg.expert_ids(i)), default=0)
    resident = plan.total_bytes - resident_experts
    minimum = int(cfg.num_experts_per_tok * len(cfg.moe_layers) * largest)
    out = {"can_page": store > 0, "store_bytes": store, "store_precision": f"int{bits}" if bits else "fp32",
           "resident_bytes": resident, "min_cache_bytes": minimum, "cache_bytes": None, "fits": None}
    if not store:
        out["reason"] = "the model has no routed experts"
    elif plan.usable_bytes is not None:
        cache = min(plan.usable_bytes - resident, store)
        out.update(cache_bytes=max(cache, 0), fits=cache >= minimum)
    return out


def suggestions(cfg: ModelConfig, target: Target, plan: MemoryPlan, quant: QuantSpec | None | str = PRESET) -> list[str]:
    """What would make a plan that does not fit, fit."""
    if plan.fits is not False:
        return []
    out = []
    if plan.format_limit_bytes is not None and plan.weights_bytes > plan.format_limit_bytes:
        out.append(f"weights under the {target.backend} model-file cap of {plan.format_limit_bytes / 2**30:.0f} GiB "
                   f"(now {plan.weights_bytes / 2**30:.2f} GiB): a lower precision or pruning")
    for precision in target.precisions:
        p = plan_memory(cfg, target, precision, plan.context)
        if p.fits and BYTES_PER_WEIGHT[precision] < BYTES_PER_WEIGHT[plan.precision]:
            out.append(f"--precision {precision} (needs {p.total_bytes / 1e9:.2f} GB)")
            break
    short = plan_memory(cfg, target, plan.precision, 512, quant=quant)
    if short.fits and plan.context > 512:
        out.append("a shorter --max-context (512 tokens fits)")
    if quant == PRESET:
        quant = preset_spec(target, plan.precision)
    routed_bytes = routed_expert_bytes(cfg, quant) if quant is not None else (
        routed_expert_bytes(cfg, None) * BYTES_PER_WEIGHT[plan.precision] / 4)
    over = max(-plan.margin_bytes, plan.weights_bytes - (plan.format_limit_bytes or plan.weights_bytes))
    if 0 < over < routed_bytes:
        out.append(f"pruning at least {over / routed_bytes:.0%} of routed experts (--prune with --calib)")
    paging = paging_plan(cfg, target, plan, quant)  # where the backend cannot page, `dsexport plan` says why
    if paging["can_page"] and paging["fits"]:
        out.append(f"expert paging (build --paged; the default here): a {paging['cache_bytes'] / 1e9:.2f} GB cache of "
                   f"the {paging['store_bytes'] / 1e9:.2f} GB {paging['store_precision']} expert store (docs/paging.md)")
    return out or ["a device with more memory: no precision, context or pruning available here makes it fit"]
