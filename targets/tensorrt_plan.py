"""The engine-build plan written into a TensorRT-bound bundle: what `dsexport engine` does on
the device (targets/tensorrt_engine.py reads it; docs/engine.md).

Decided here, at export time, from the model and the target profile: precision and how it is
expressed for the TensorRT version (builder flags, or a strongly typed network), TF32 off,
the layers that stay FP32 under FP16, optimization profiles for prefill and decode shapes,
the prefill chunk and the workspace, both sized from the device's usable memory.
"""

from __future__ import annotations

from dsexport.core.config import ModelConfig
from dsexport.core.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, past_name
from dsexport.core.errors import UserError
from dsexport.core.sections import EngineGraph, EnginePlan, ShapeRange

from .registry import Target
from .tensorrt_versions import parser_version

# Node-name patterns (ONNX node names of exporter/export.py) kept in FP32 under an FP16 build:
# RMSNorm's mean of squares overflows FP16 at DeepSeek widths, and the router's scores, top-k
# choice and attention softmax decide discrete outcomes that must match the reference.
FP32_LAYERS = ("n_*layernorm*", "n_norm*", "n_*mlp_scores*", "n_*mlp_choice*", "n_*mlp_masked*", "n_*mlp_g*",
               "n_*mlp_topk*", "n_*mlp_w*", "n_*router*", "n_*self_attn_scores*", "n_*self_attn_masked*",
               "n_*self_attn_probs*")
# int8 / int4 are weight-only: DequantizeLinear on constant weights in the graph (exporter/qdq.py),
# activations in fp16 (builder flags) or, strongly typed, in the scales' type (fp32)
ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
QUANT_FLAGS = {"int8": ("INT8",), "int4": ("INT8", "INT4")}  # int4 bundles keep int8 parts (lm_head)
ACTIVATION_SHARE = 0.05  # of usable memory, for the dense prefill MoE activations
WORKSPACE_SHARE = 0.05
MAX_PREFILL_TOKENS, MIN_PREFILL_TOKENS = 512, 16


def prefill_tokens(cfg: ModelConfig, target: Target, precision: str) -> int:
    """Prompt tokens per prefill step: the dense MoE lowering holds [E, tokens, 2I] + [E, tokens, D]."""
    if target.device is None:
        return MAX_PREFILL_TOKENS
    experts = max((cfg.num_experts(i) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), default=0)
    per_token = experts * (2 * cfg.moe_intermediate_size + cfg.hidden_size) * (4 if precision == "fp32" else 2)
    tokens = MAX_PREFILL_TOKENS
    while tokens > MIN_PREFILL_TOKENS and per_token * tokens > ACTIVATION_SHARE * target.device.usable_gb * 1e9:
        tokens //= 2
    return tokens


def _shapes(min_: list[int], opt: list[int], max_: list[int]) -> ShapeRange:
    return ShapeRange(tuple(min_), tuple(opt), tuple(max_))


def _profile(cfg: ModelConfig, batch: int, seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict:
    L = cfg.latent_dim
    tokens = _shapes([1, seq[0]], [1, seq[1]], [batch, seq[2]])
    profile = {INPUT_IDS: tokens, POSITION_IDS: tokens,
               ATTENTION_MASK: _shapes([1, seq[0] + past[0]], [1, seq[1] + past[1]], [batch, seq[2] + past[2]])}
    for i in range(cfg.num_hidden_layers):
        profile[past_name(i)] = _shapes([1, past[0], L], [1, past[1], L], [batch, past[2], L])
    return profile


def engine_plan(cfg: ModelConfig, target: Target, precision: str, tensorrt: str, context: int,
                graph_file: str, batch: int = 1) -> EnginePlan:
    parser = parser_version(tensorrt)
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"precision {precision} for TensorRT engines arrives with quantization (Q/DQ in the graph); "
                        f"available now: {', '.join(ENGINE_PRECISIONS)}")
    if parser.strongly_typed_only and precision == "fp16":
        others = "/".join(v for v in (target.device.tensorrt if target.device else ()) if v != parser.name) or "10.13"
        raise UserError(f"TensorRT {parser.name} builds only strongly typed networks, so {precision} must be carried "
                        f"in the graph, which this dsexport does not do yet; use --precision fp32 or --tensorrt {others}")
    chunk = min(prefill_tokens(cfg, target, precision), context - 1)
    usable = target.device.usable_gb * 1e9 if target.device else 16e9
    opt_past = min(512, context // 2)
    # One engine, two optimization profiles: decode (one new token; the If takes the `gather`
    # branch) and prompts (2..chunk new tokens; the `dense` branch). Weights are in it once.
    profiles = (_profile(cfg, batch, (1, 1, 1), (0, opt_past, context - 1)),
                _profile(cfg, batch, (2, min(128, chunk), chunk), (0, 0, context - chunk)))
    fp16_flags = precision in ("fp16", "int8", "int4") and not parser.strongly_typed_only
    return EnginePlan(
        tensorrt=parser.name, precision=precision, strongly_typed=parser.strongly_typed_only,
        # Q/DQ weights: the INT8 (and for INT4 weights the INT4, TensorRT 10+) flag lets a weakly
        # typed network select quantized layers (not checked on a device)
        builder_flags=tuple(["FP16", *QUANT_FLAGS.get(precision, ()), "OBEY_PRECISION_CONSTRAINTS"] if fp16_flags else []),
        tf32=False,  # TF32 is on by default on Ampere+ (Orin): an fp32 layer must stay fp32
        fp32_layers=tuple(FP32_LAYERS) if fp16_flags else (),
        workspace_bytes=int(min(1 << 30, WORKSPACE_SHARE * usable)) // (1 << 20) << 20,
        timing_cache="engines/timing.cache", int64_io_as_int32=not parser.int64_native, context=context,
        max_batch=batch, prefill_tokens=chunk,
        graphs={"decoder": EngineGraph(graph_file, "engines/decoder.plan", profiles)})
