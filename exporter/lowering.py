"""How a DeepSeekMoE layer becomes ONNX: routing in standard ops, experts by a chosen lowering.

Lowerings live in a registry keyed by name; a target (dsexport.targets) names the one it takes.
Routing is always computed in the graph from the hidden state (never baked in at export):

  ort-moe  ONNX Runtime's fused com.microsoft.MoE op. Selection is done before the op; the op
           gets log(weight) at the chosen experts and -inf elsewhere, so its softmax returns
           w / sum(w) at exactly those experts; the per-token sum(w) is multiplied back after it.
           Runs only the routed experts for any number of tokens: fit for prefill and decode.
  gather   Standard ops only (TopK, Gather of stacked experts, batched MatMul): what TensorRT
           parses. Materializes tokens x k expert weights, so it is for decode-sized inputs.
  dense    Standard ops only: every expert on every token as one batched MatMul over the
           stacked weights, weighted by the routing weights scattered into [tokens, E] (zero
           at unrouted experts). Reads each expert once whatever the token count, computes E/k
           times the routed FLOPs: the prefill graph of TensorRT targets (docs/tensorrt.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dsexport.core.config import ModelConfig, group_table
from .graph import MS_DOMAIN, GraphBuilder


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    router: np.ndarray  # [E, D]
    bias: np.ndarray | None  # [E] noaux_tc correction bias
    gate: np.ndarray  # [E, I, D]
    up: np.ndarray  # [E, I, D]
    down: np.ndarray  # [E, D, I]
    groups: tuple[int, ...] = ()  # routing group of each expert; () = E / n_group consecutive


@dataclasses.dataclass(frozen=True)
class LoweringOptions:
    # ort-moe: split each expert's intermediate dimension into this many shards, placed in
    # separate expert-index ranges. ONNX Runtime's CPU MoE kernel gives each thread a contiguous
    # range of expert slots, so with one shard per thread every thread holds a slice of every
    # routed expert: the decode work is balanced whatever experts the router picks.
    moe_shards: int = 1
    expert_bits: int | None = None  # ort-moe: QMoE with block-wise int8/int4 experts (exporter/quantize.py)
    block_size: int = 32
    slot_bits: tuple[int, ...] | None = None  # per-expert widths when they differ (one QMoE per width)
    # QMoE accuracy_level: 4 quantizes the 4-bit experts' activations to int8 per block (ONNX
    # Runtime 1.32's fast path: 4.4x faster per decode step on an M-shaped layer); its 8-bit path
    # always does. 0 keeps 4-bit activations fp32.
    accuracy_level: int = 0
    scheme: str = "absmax"  # quantization scheme (exporter/quantize.py)
    # Stacked experts as DequantizeLinear on constant int8/int4 weights (TensorRT targets,
    # exporter/qdq.py) instead of fp32; per_channel_bits as in QuantConfig.
    qdq: bool = False
    per_channel_bits: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class MoELowering:
    name: str
    # emit(g, x [N, D], router_logits [N, E], weights, cfg, name, options) -> routed output [N, D]
    emit: Callable[[GraphBuilder, str, str, ExpertWeights, ModelConfig, str, LoweringOptions], str]
    prefill_ok: bool  # False: cost grows as tokens x k x expert bytes; decode only
    ops: tuple[str, ...]  # op types it adds beyond routing, for target compatibility checks
    description: str


MOE_LOWERINGS: dict[str, MoELowering] = {}


def register(name: str, prefill_ok: bool, ops: tuple[str, ...], description: str):
    def wrap(fn):
        MOE_LOWERINGS[name] = MoELowering(name, fn, prefill_ok, ops, description)
        return fn

    return wrap


def emit_routing(g: GraphBuilder, logits: str, w: ExpertWeights, cfg: ModelConfig, name: str) -> tuple[str, str]:
    """router logits [N, E] -> (raw scores of the chosen experts [N, k], expert slots [N, k] int64).

    Normalization and routed_scaling_factor are left to the lowering (`final_weights`), which
    can often fold them away (reference.route applies them at the end, the same arithmetic).
    """
    E, k = w.router.shape[0], cfg.num_experts_per_tok
    if cfg.scoring_func == "softmax":
        scores = g.op("Softmax", [logits], name=name + "_scores", axis=-1)
    else:
        scores = g.op("Sigmoid", [logits], name=name + "_scores")
    choice = scores
    if w.bias is not None:
        choice = g.op("Add", [scores, g.weight(name + ".bias", w.bias.astype(np.float32))], name=name + "_choice")
    if cfg.grouped_routing:
        choice = _emit_group_mask(g, choice, w.groups or tuple(e // (E // cfg.n_group) for e in range(E)), cfg, name)
    idx = g.op("TopK", [choice, g.const([k])], name=name + "_topk", outputs=2, axis=-1)[1]  # [N, k]
    return g.op("GatherElements", [scores, idx], name=name + "_w", axis=1), idx  # [N, k]


def final_weights(g: GraphBuilder, raw: str, cfg: ModelConfig, name: str) -> str:
    """Routing weights as the model applies them: normalized if norm_topk_prob, then scaled."""
    weights = raw
    if cfg.norm_topk_prob:
        total = g.op("ReduceSum", [raw, g.const([-1])], name=name + "_wsum", keepdims=1)
        total = g.op("Add", [total, g.const(1e-20, np.float32)], name=name + "_wsum_eps")
        weights = g.op("Div", [raw, total], name=name + "_wnorm")
    if cfg.routed_scaling_factor != 1.0:
        weights = g.op("Mul", [weights, g.const(cfg.routed_scaling_factor, np.float32)], name=name + "_wscaled")
    return weights


def _emit_group_mask(g: GraphBuilder, choice: str, groups: tuple[int, ...], cfg: ModelConfig, name: str) -> str:
    """Keep the experts of the topk_group best groups; -inf elsewhere. Groups may be uneven."""
    table, padded = group_table(groups, cfg.n_group)  # [G, S] slots, padding = slot E
    source = choice
    if padded:
        first = g.op("Slice", [choice, g.const([0]), g.const([1]), g.const([1])], name=name + "_col0")
        neg = g.op("Add", [g.op("Mul", [first, g.const(0.0, np.float32)], name=name + "_zero"),
                           g.const(-np.inf, np.float32)], name=name + "_ninf_col")
        source = g.op("Concat", [choice, neg], name=name + "_padded", axis=1)  # [N, E+1]
    grouped = g.op("Gather", [source, g.const(table)], name=name + "_grouped", axis=1)  # [N, G, S]
    if cfg.topk_method == "noaux_tc":
        top = g.op("TopK", [grouped, g.const([min(2, len(table[0]))])], name=name + "_top2", outputs=2, axis=-1)[0]
        if padded:  # a group holding one expert scores that expert; an empty group is never kept
            # Equal(-inf) rather than IsInf: TensorRT 8.5 cannot parse IsInf (added in 8.6)
            ninf = g.const(-np.inf, np.float32)
            finite = g.op("Where", [g.op("Equal", [top, ninf], name=name + "_padinf"), g.const(0.0, np.float32), top],
                          name=name + "_top2f")
            total = g.op("ReduceSum", [finite, g.const([-1])], name=name + "_gsum", keepdims=0)
            best = g.reduce("ReduceMax", top, [-1], name + "_gbest", keepdims=0)
            empty = g.op("Equal", [best, ninf], name=name + "_gempty")
            group_scores = g.op("Where", [empty, g.const(-np.inf, np.float32), total], name=name + "_gscore")
        else:
            group_scores = g.op("ReduceSum", [top, g.const([-1])], name=name + "_gscore", keepdims=0)
    else:
        group_scores = g.reduce("ReduceMax", grouped, [-1], name + "_gscore", keepdims=0)  # [N, G]
    group_idx = g.op("TopK", [group_scores, g.const([cfg.topk_group])], name=name + "_gtop", outputs=2, axis=-1)[1]
    zeros = g.op("Expand", [g.const(0.0, np.float32), g.op("Shape", [group_scores], name=name + "_gsshape")],
                 name=name + "_gzero")
    ones = g.op("Expand", [g.const(1.0, np.float32), g.op("Shape", [group_idx], name=name + "_gishape")],
                name=name + "_gone")
    group_mask = g.op("ScatterElements", [zeros, group_idx, ones], name=name + "_gmask", axis=1)  # [N, G]
    keep = g.op("Gather", [group_mask, g.const(list(groups))], name=name + "_keep", axis=1)  # [N, E]
    keep = g.op("Greater", [keep, g.const(0.5, np.float32)], name=name + "_keepb")
    return g.op("Where", [keep, choice, g.const(-np.inf, np.float32)], name=name + "_masked")


def moe_shard_count(inter: int, shards: int, expert_bits: int | None, block: int) -> int:
    """How many shards the fused MoE op splits each expert's intermediate units into."""
    S = shards if inter % shards == 0 else 1
    if expert_bits and (inter // S) % block:
        S = 1  # quantization blocks run along fc2's K (= inter / S): shards must not cut a block
    return S


@register("ort-moe", prefill_ok=True, ops=("com.microsoft.MoE",),
          description="ONNX Runtime fused MoE op (interleaved SwiGLU), routing computed before it")
def emit_ort_moe(g: GraphBuilder, x: str, logits: str, w: ExpertWeights, cfg: ModelConfig, name: str,
                 opts: LoweringOptions) -> str:
    E, inter, D = w.gate.shape
    if opts.slot_bits and len(set(opts.slot_bits)) > 1:
        return _emit_mixed_width(g, x, logits, w, cfg, name, opts)
    S = moe_shard_count(inter, opts.moe_shards, opts.expert_bits, opts.block_size)
    raw, idx = emit_routing(g, logits, w, cfg, name)
    # Router input: log(score) at the chosen slots, -inf elsewhere; the op's softmax then
    # yields score / (S * sum(scores)) at each of the S shards of each chosen expert. That is
    # norm_topk_prob's normalization (the factor S is folded into fc2); without it the sum is
    # multiplied back after the op.
    logw = g.op("Log", [raw], name=name + "_logw")  # [N, k]
    if S > 1:
        idx = g.op("Concat", [g.op("Add", [idx, g.const(s * E)], name=f"{name}_slot{s}") if s else idx
                              for s in range(S)], name=name + "_slots", axis=1)  # [N, S*k]
        logw = g.op("Concat", [logw] * S, name=name + "_logw_slots", axis=1)
    logits_shape = g.op("Concat", [g.op("Shape", [x], name=name + "_xshape", start=0, end=1), g.const([S * E])],
                        name=name + "_eshape", axis=0)
    dense = g.op("Expand", [g.const(-np.inf, np.float32), logits_shape], name=name + "_ninf")
    router_in = g.op("ScatterElements", [dense, idx, logw], name=name + "_router_in", axis=1)  # [N, S*E]
    # Slot s*E + e holds shard s of expert e: a slice of its intermediate units. SwiGLU acts per
    # unit, so the shards' outputs sum to the expert's output exactly.
    part = inter // S
    gate = w.gate.reshape(E, S, part, D).transpose(1, 0, 2, 3)  # [S, E, I/S, D]
    up = w.up.reshape(E, S, part, D).transpose(1, 0, 2, 3)
    fc1 = np.stack([gate, up], axis=3).reshape(S * E, 2 * part, D)  # rows g0,u0,g1,u1,... (swiglu_fusion=1)
    down = w.down.reshape(E, D, S, part).transpose(2, 0, 1, 3).reshape(S * E, D, part)  # [S*E, D, I/S]
    # routed_scaling_factor (and the shard count) folded into the down projection
    fold = np.float32(cfg.routed_scaling_factor * S)
    attrs = dict(name=name + "_moe", domain=MS_DOMAIN, k=S * cfg.num_experts_per_tok, activation_type="swiglu",
                 swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)
    if opts.expert_bits:
        bits, block = opts.expert_bits, opts.block_size
        y = g.op("QMoE", _qmoe_inputs(g, x, router_in, fc1, down, fold, bits, block, opts.scheme, name),
                 expert_weight_bits=bits, block_size=block, accuracy_level=opts.accuracy_level, **attrs)
    else:
        y = g.op("MoE", [x, router_in, g.weight(name + ".fc1", fc1.astype(np.float32)), "",
                         g.weight(name + ".fc2", (down * fold).astype(np.float32))], **attrs)
    if cfg.norm_topk_prob:
        return y
    total = g.op("ReduceSum", [raw, g.const([-1])], name=name + "_total", keepdims=1)  # [N, 1]
    return g.op("Mul", [y, total], name=name + "_routed")


def _qmoe_inputs(g: GraphBuilder, x: str, router_in: str, fc1: np.ndarray, fc2: np.ndarray, fold: np.float32,
                 bits: int, block: int, scheme: str, name: str) -> list[str]:
    """QMoE's inputs: packed block-wise weights, scales (fc2's scaled by `fold`: the quantized
    values stay those of the weights) and, for the asymmetric scheme, zero points."""
    from .quantize import pack, pack_zero_points, quantize_rows

    q1, d1, z1 = quantize_rows(fc1, bits, block, scheme)  # [E, 2I, Dp], [E, 2I, Dp/block]
    q2, d2, z2 = quantize_rows(fc2, bits, block, scheme)  # [E, D, Ip], [E, D, Ip/block]
    inputs = [x, router_in, g.weight(name + ".fc1q", pack(q1, bits)), g.weight(name + ".fc1s", d1), "",
              g.weight(name + ".fc2q", pack(q2, bits)), g.weight(name + ".fc2s", (d2 * fold).astype(np.float32))]
    if z1 is not None:
        inputs += ["", "", "", "", g.weight(name + ".fc1z", pack_zero_points(z1, bits)),
                   g.weight(name + ".fc2z", pack_zero_points(z2, bits))]
    return inputs


def _stacked_weights(g: GraphBuilder, w: ExpertWeights, name: str, opts: LoweringOptions) -> tuple[str, str]:
    """Stacked expert weights as MatMul operands: gate|up [E, D, 2I] and down [E, I, D] (with
    opts.qdq and expert bits: DequantizeLinear of int8/int4 constants, exporter/qdq.py)."""
    if opts.qdq and opts.expert_bits:
        from .qdq import stacked_qdq
        from .quantize import weight_layout

        def layout(K: int) -> tuple[int, int]:
            return weight_layout(opts.expert_bits, opts.block_size, K, opts.per_channel_bits, qdq=True)

        return (stacked_qdq(g, np.concatenate([w.gate, w.up], axis=1), name + ".w13", *layout(w.gate.shape[2])),
                stacked_qdq(g, w.down, name + ".w2", *layout(w.down.shape[2])))
    w13 = np.concatenate([w.gate, w.up], axis=1).transpose(0, 2, 1)
    w2 = w.down.transpose(0, 2, 1)
    return (g.weight(name + ".w13", np.ascontiguousarray(w13, np.float32)),
            g.weight(name + ".w2", np.ascontiguousarray(w2, np.float32)))


def _swiglu(g: GraphBuilder, h: str, inter: int, name: str) -> str:
    """[.., 2I] (gate | up) -> silu(gate) * up [.., I]."""
    gate, up = g.op("Split", [h, g.const([inter, inter])], name=name + "_gu", outputs=2, axis=-1)
    return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], name=name + "_sig")], name=name + "_silu"), up],
                name=name + "_act")


def _emit_mixed_width(g: GraphBuilder, x: str, logits: str, w: ExpertWeights, cfg: ModelConfig, name: str,
                      opts: LoweringOptions) -> str:
    """Experts of different bit widths: one QMoE per width over its experts. Each op gets log(score)
    at the chosen experts of its width and -1e30 elsewhere (not -inf: an op none of whose experts
    was chosen must not produce NaN); it returns sum_i (s_i / S_g) f_i over its chosen experts,
    so the layer output is sum_g S_g y_g (divided by the sum of all chosen scores under
    norm_topk_prob). Costs: each op runs top-k experts whether or not they were chosen."""
    E, inter, D = w.gate.shape
    raw, idx = emit_routing(g, logits, w, cfg, name)  # [N, k]
    logw = g.op("Log", [raw], name=name + "_logw")
    fc1 = np.stack([w.gate, w.up], axis=2).reshape(E, 2 * inter, D)  # interleaved gate/up rows
    fold = np.float32(cfg.routed_scaling_factor)
    y = None
    for bits in sorted(set(opts.slot_bits)):
        slots = [s for s, b in enumerate(opts.slot_bits) if b == bits]
        n, tag = len(slots), f"{name}_w{bits}"
        local = np.full(E, n, np.int64)  # other widths' experts go to a dummy column n, sliced off
        local[slots] = np.arange(n)
        lidx = g.op("Gather", [g.const(local), idx], name=tag + "_lidx", axis=0)  # [N, k]
        mine = g.op("Less", [lidx, g.const(n)], name=tag + "_mine")
        lw = g.op("Where", [mine, logw, g.const(-1e30, np.float32)], name=tag + "_lw")
        shape = g.op("Concat", [g.op("Shape", [x], name=tag + "_xshape", start=0, end=1), g.const([n + 1])],
                     name=tag + "_shape", axis=0)
        dense = g.op("Expand", [g.const(-1e30, np.float32), shape], name=tag + "_bg")
        router_in = g.op("Slice", [g.op("ScatterElements", [dense, lidx, lw], name=tag + "_scatter", axis=1),
                                   g.const([0]), g.const([n]), g.const([1])], name=tag + "_router_in")  # [N, n]
        share = g.op("ReduceSum", [g.op("Where", [mine, raw, g.const(0.0, np.float32)], name=tag + "_rawm"),
                                   g.const([-1])], name=tag + "_share", keepdims=1)  # [N, 1]
        attrs = dict(k=min(cfg.num_experts_per_tok, n), activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=0)
        part = g.op("QMoE", _qmoe_inputs(g, x, router_in, fc1[slots], w.down[slots], fold, bits, opts.block_size,
                                         opts.scheme, tag), name=tag + "_moe", domain=MS_DOMAIN, expert_weight_bits=bits, block_size=opts.block_size,
                    accuracy_level=opts.accuracy_level, **attrs)
        part = g.op("Mul", [part, share], name=tag + "_scaled")
        y = part if y is None else g.op("Add", [y, part], name=tag + "_sum")
    if cfg.norm_topk_prob:
        total = g.op("ReduceSum", [raw, g.const([-1])], name=name + "_total", keepdims=1)
        y = g.op("Div", [y, g.op("Add", [total, g.const(1e-20, np.float32)], name=name + "_total_eps")], name=name + "_routed")
    return y


@register("gather", prefill_ok=False, ops=("Gather", "MatMul", "TopK"),
          description="standard ops: gather the routed experts' stacked weights per token, batched MatMul")
def emit_gather(g: GraphBuilder, x: str, logits: str, w: ExpertWeights, cfg: ModelConfig, name: str,
                opts: LoweringOptions) -> str:
    raw, idx = emit_routing(g, logits, w, cfg, name)
    weights = final_weights(g, raw, cfg, name)
    w13, w2 = _stacked_weights(g, w, name, opts)
    w1_sel = g.op("Gather", [w13, idx], name=name + "_w13sel", axis=0)  # [N, k, D, 2I]
    x4 = g.op("Unsqueeze", [x, g.const([1, 2])], name=name + "_x4")  # [N, 1, 1, D]
    act = _swiglu(g, g.op("MatMul", [x4, w1_sel], name=name + "_h13"), w.gate.shape[1], name)  # [N, k, 1, I]
    w2_sel = g.op("Gather", [w2, idx], name=name + "_w2sel", axis=0)  # [N, k, I, D]
    out = g.op("Squeeze", [g.op("MatMul", [act, w2_sel], name=name + "_down"), g.const([2])], name=name + "_out")
    out = g.op("Mul", [out, g.op("Unsqueeze", [weights, g.const([-1])], name=name + "_w3")], name=name + "_weighted")
    return g.op("ReduceSum", [out, g.const([1])], name=name + "_routed", keepdims=0)  # [N, D]


@register("dense", prefill_ok=True, ops=("MatMul", "ScatterElements", "ReduceSum"),
          description="standard ops: all experts on all tokens, weighted by scattered routing weights (prefill)")
def emit_dense(g: GraphBuilder, x: str, logits: str, w: ExpertWeights, cfg: ModelConfig, name: str,
               opts: LoweringOptions) -> str:
    E = w.gate.shape[0]
    raw, idx = emit_routing(g, logits, w, cfg, name)
    weights = final_weights(g, raw, cfg, name)  # [N, k]
    dense_shape = g.op("Concat", [g.op("Shape", [x], name=name + "_xshape", start=0, end=1), g.const([E])],
                       name=name + "_eshape", axis=0)
    zeros = g.op("Expand", [g.const(0.0, np.float32), dense_shape], name=name + "_wzero")
    dense = g.op("ScatterElements", [zeros, idx, weights], name=name + "_wdense", axis=1)  # [N, E]
    w13, w2 = _stacked_weights(g, w, name, opts)  # the same weights as `gather`'s: an If shares them
    x3 = g.op("Unsqueeze", [x, g.const([0])], name=name + "_x3")  # [1, N, D]
    act = _swiglu(g, g.op("MatMul", [x3, w13], name=name + "_h13"), w.gate.shape[1], name)  # [E, N, I]
    y = g.op("MatMul", [act, w2], name=name + "_down")  # [E, N, D]
    scale = g.op("Unsqueeze", [g.op("Transpose", [dense], name=name + "_wT", perm=[1, 0]), g.const([-1])],
                 name=name + "_w3")  # [E, N, 1]
    out = g.op("Mul", [y, scale], name=name + "_weighted")
    return g.op("ReduceSum", [out, g.const([0])], name=name + "_routed", keepdims=0)  # [N, D]


def get_lowering(name: str) -> MoELowering:
    if name not in MOE_LOWERINGS:
        from dsexport.core.errors import UserError

        raise UserError(f"unknown MoE lowering {name!r}; available: {', '.join(sorted(MOE_LOWERINGS))}")
    return MOE_LOWERINGS[name]
