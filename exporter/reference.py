"""The reference PyTorch model of DeepSeek-V2/V3: the executable specification.

Every later stage (export, runtime, calibration, compression) is checked against this model,
and this model is checked against transformers 5's DeepseekV2/V3ForCausalLM. It is small on
purpose: MLA with a latent KV cache, DeepSeekMoE routing (greedy, group-limited, noaux_tc),
shared experts, dense first layers. Routed experts are stacked per layer as [E, I, D] and the
number of experts may differ per layer (pruning).

Built on the meta device and filled by assignment from the checkpoint reader, so the weights
exist once in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointReader
from dsexport.core.config import ModelConfig, group_table
from .rope import rope_deinterleave_permutation, rope_frequencies

# The two MLA-internal RMSNorms (q_a_layernorm, kv_a_layernorm) use a fixed eps in both
# DeepSeek's code and transformers, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope on the last dim; cos/sin [.., T, d/2] broadcast against x [.., T, d]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def route(logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig,
          groups: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing. logits [N, E] -> (weights [N, k], expert slots [N, k]).

    greedy: top-k of softmax. group_limited_greedy: keep topk_group groups by their best
    softmax score, then top-k. noaux_tc: sigmoid scores; selection on scores + correction bias,
    groups ranked by the sum of their top-2 biased scores; weights are the unbiased scores.
    `groups` gives each expert's group (default: E / n_group consecutive experts per group).
    After pruning a group may hold one expert (its score is that expert's) or none (never kept).
    """
    N, E = logits.shape
    logits = logits.float()
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()  # [N, E]
    choice = scores + bias if bias is not None else scores
    if cfg.grouped_routing:
        if groups is None:
            groups = tuple(e // (E // cfg.n_group) for e in range(E))
        table, _ = group_table(groups, cfg.n_group)
        padded = torch.cat([choice, choice.new_full((N, 1), float("-inf"))], dim=1)
        grouped = padded[:, torch.tensor(table, device=choice.device)]  # [N, G, S], padding at -inf
        if cfg.topk_method == "noaux_tc":
            top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values
            group_scores = torch.where(top.isinf(), 0.0, top).sum(-1)
            group_scores = group_scores.masked_fill(top[..., 0].isinf(), float("-inf"))  # empty groups
        else:
            group_scores = grouped.max(dim=-1).values  # [N, G]
        group_idx = group_scores.topk(cfg.topk_group, dim=-1).indices  # [N, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask[:, torch.tensor(groups, device=choice.device)].bool()  # [N, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [N, k]
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        num_experts = cfg.num_experts(layer)
        self.groups = cfg.expert_groups(layer)
        self.expert_ids = cfg.expert_ids(layer)
        D, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.router = nn.Parameter(torch.empty(num_experts, D))  # [E, D]
        self.bias = nn.Parameter(torch.zeros(num_experts)) if cfg.uses_correction_bias else None  # [E]
        self.w_gate = nn.Parameter(torch.empty(num_experts, inter, D))  # [E, I, D]
        self.w_up = nn.Parameter(torch.empty(num_experts, inter, D))  # [E, I, D]
        self.w_down = nn.Parameter(torch.empty(num_experts, D, inter))  # [E, D, I]
        self.shared = MLP(D, inter * cfg.n_shared_experts) if cfg.n_shared_experts else None
        # Calibration hook: recorder(expert slot, routing weights [n], expert output norms [n])
        # for the n tokens routed to that expert in this call (dsexport.calibration).
        self.recorder = None
        # Routing hook: route_recorder(expert slots [N, k]) for every call (validate, golden coverage).
        self.route_recorder = None
        # int8 experts: ONNX Runtime's QMoE kernel quantizes the expert inputs and the SwiGLU
        # output to int8, symmetric, per block of this many values; the reference does the same
        # so that a quantized bundle can be checked exactly (exporter/quantize.py).
        self.activation_quant_block: int | None = None
        self.activation_quant_slots: set[int] | None = None  # None: every expert

    def _act_quant(self, h: torch.Tensor, slot: int) -> torch.Tensor:
        if self.activation_quant_block is None or (self.activation_quant_slots is not None
                                                   and slot not in self.activation_quant_slots):
            return h
        return quantize_activations(h, self.activation_quant_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, idx = route(x @ self.router.T, self.bias, self.cfg, self.groups)  # [N, k], [N, k]
        if self.route_recorder is not None:
            self.route_recorder(idx)
        out = torch.zeros_like(x)
        # Loop over the experts that received tokens: exact, and cheap for prefill.
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        load = torch.bincount(flat_idx, minlength=self.w_gate.shape[0])  # tokens per expert [E]
        if self.training:
            self.load = load.float()  # read by training for the auxiliary-loss-free bias update
        counts = load.tolist()
        token_of = order // idx.shape[1]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]
            tokens = token_of[start : start + n]
            start += n
            h = self._act_quant(x[tokens], e)
            h = self._act_quant(F.silu(h @ self.w_gate[e].T) * (h @ self.w_up[e].T), e)
            h = h @ self.w_down[e].T  # [n, D] the expert's output
            w = weights.flatten()[rows]  # [n]
            if self.recorder is not None:
                self.recorder(e, w, h.float().norm(dim=-1))
            out.index_add_(0, tokens, h * w[:, None].to(h.dtype))  # routing is fp32
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 per block of the last dim (round half to even, as ONNX Runtime's MLAS)."""
    shape = x.shape
    pad = -shape[-1] % block  # a last partial block is quantized on its own (zeros do not change its max)
    if pad:
        x = F.pad(x, (0, pad))
    b = x.reshape(*shape[:-1], x.shape[-1] // block, block)
    amax = b.abs().amax(-1, keepdim=True)
    scale = amax / 127
    inverse = torch.where(amax == 0, torch.zeros_like(scale), 127 / amax)  # MLAS: 127 / absmax on every ISA
    return (torch.round(b * inverse) * scale).reshape(x.shape)[..., : shape[-1]]


class LatentCache:
    """Per layer, the normalized KV latent and the rotated rope key: [B, S, kv_lora_rank + rope]."""

    def __init__(self, num_layers: int = 0):
        self.layers: dict[int, torch.Tensor] = {}

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        old = self.layers.get(layer)
        self.layers[layer] = new if old is None else torch.cat([old, new], dim=1)
        return self.layers[layer]

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).shape[1] if self.layers else 0


class ForcedLatents(LatentCache):
    """A whole sequence's latents from elsewhere (a bundle's cache): attention reads these instead
    of the ones the reference computes, which are kept in `own` for comparison. Each position is
    then computed from the same keys and values as the bundle, so a difference at one position
    (e.g. an int8 rounding that went the other way) stays at that position (exporter/validate.py)."""

    def __init__(self, latents: list[torch.Tensor]):
        super().__init__()
        self.forced = latents
        self.own: dict[int, torch.Tensor] = {}

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        self.own[layer] = new
        return self.forced[layer]

    @property
    def length(self) -> int:
        return 0  # the forced latents cover the whole sequence: no past


class MLA(nn.Module):
    """Multi-head latent attention. The cache holds the latent; keys/values are expanded per call.

    Rope rows of the q and kv_a projections are stored de-interleaved (see rope.py), so one
    rotate-half formula serves interleaved and non-interleaved checkpoints.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.hidden_size, cfg.num_attention_heads
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=bias)

    def forward(self, x, cos, sin, mask, layer: int, cache: LatentCache | None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, dn + dr).transpose(1, 2)  # [B, H, T, dn+dr]
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        q_rope = apply_rope(q_rope, cos[:, None], sin[:, None])

        kv = self.kv_a_proj_with_mqa(x)  # [B, T, r+dr]
        latent, k_rope = kv.split([r, dr], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin)], dim=-1)  # [B, T, r+dr]
        if cache is not None:
            latent = cache.update(layer, latent)  # [B, S, r+dr]
        S = latent.shape[1]
        c, k_rope = latent.split([r, dr], dim=-1)
        kv = self.kv_b_proj(c).view(B, S, H, dn + dv).transpose(1, 2)  # [B, H, S, dn+dv]
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, dr)], dim=-1)
        scores = (torch.cat([q_nope, q_rope], -1) @ k.transpose(-1, -2)) * cfg.softmax_scale  # [B, H, T, S]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v  # [B, H, T, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, self.layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_and_mask(inv_freq: torch.Tensor, rope_scale: float, shape: tuple[int, int], past: int,
                       attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None):
    """Rope cos/sin [B, T, dr/2] and the causal + padding mask [B, 1, T, S] for T new tokens."""
    B, T = shape
    S = past + T
    device = inv_freq.device  # the model's device (CPU or CUDA)
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, dr/2]
    causal = torch.arange(S, device=device)[None, :] <= torch.arange(past, S, device=device)[:, None]  # [T, S]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
    return freqs.cos() * rope_scale, freqs.sin() * rope_scale, mask


class DeepseekReference(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S] 1 = real token, S = past + T
        position_ids: torch.Tensor | None = None,  # [B, T]
        cache: LatentCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # logits [B, T, V] (, hidden [B, T, D])
        past = cache.length if cache is not None else 0
        cos, sin, mask = positions_and_mask(self.inv_freq, self.rope_scale, input_ids.shape, past,
                                            attention_mask, position_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        hidden = self.norm(x)  # what the MTP module reads (after the final norm, as vLLM and SGLang feed it)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader, quant=None) -> "DeepseekReference":
        """quant: a dsexport.exporter.quantize.QuantConfig: the model with the dequantized weights
        a quantized bundle computes with (exporter/quantize.py: fake_quantize)."""
        cfg = reader.config
        with torch.device("meta"):
            model = cls(cfg)
        inv_freq, model.rope_scale = rope_frequencies(cfg)
        model.inv_freq = inv_freq
        state = {name: tensor for name, tensor in iter_reference_tensors(reader, quant)}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f"reference weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for layer in model.layers:
            set_activation_quant(layer, quant)
        block = quant.projection_activation_block("lm_head") if quant is not None else None
        if block:
            quantize_inputs(model.lm_head, block)
        return model.eval()


@torch.no_grad()
def streamed_hidden(reader: CheckpointReader, sequences: list[list[int]], quant=None,
                    routes: dict[int, list] | None = None, chunk: int = 16) -> list[torch.Tensor]:
    """The final hidden states after the model's norm, [T, D] per sequence, holding one decoder
    layer at a time: memory stays at one layer plus the sequences' hidden states, whatever the
    model's size. Sequences of one length run together, `chunk` at a time. quant: the bundle's
    QuantSpec (the dequantized model). routes: filled with {MoE layer: [expert slots [T, k] per
    sequence]}."""
    from .quantize import fake_quantize

    cfg = reader.config
    inv_freq, rope_scale = rope_frequencies(cfg)
    embed = reader.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    states = [embed[torch.tensor(seq)][None] for seq in sequences]  # [1, T, D] each
    del embed
    groups: dict[int, list[int]] = {}
    for n, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(n)
    batches = [members[c:c + chunk] for members in groups.values() for c in range(0, len(members), chunk)]
    rope = {T: positions_and_mask(inv_freq, rope_scale, (1, T), 0, None, None) for T in groups}
    for i in range(cfg.num_hidden_layers):
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        tensors = {n: fake_quantize(n, t, quant, i, cfg.expert_ids(i)) for n, t in layer_tensors(reader, i)}
        layer.load_state_dict(tensors, strict=True, assign=True)
        set_activation_quant(layer, quant)
        recorded: list[torch.Tensor] = []
        if routes is not None and isinstance(layer.mlp, MoE):
            layer.mlp.route_recorder = recorded.append
            routes[i] = [None] * len(sequences)
        for part in batches:
            T = len(sequences[part[0]])
            out = layer(torch.cat([states[n] for n in part]), *rope[T], None)  # [B, T, D]
            for b, n in enumerate(part):
                states[n] = out[b:b + 1]
            if recorded:
                slots = recorded.pop().reshape(len(part), T, -1)  # the MoE saw [B*T, k]
                for b, n in enumerate(part):
                    routes[i][n] = slots[b].numpy().copy()
        del layer
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight = nn.Parameter(reader.get("model.norm.weight", (cfg.hidden_size,)))
    return [norm(x)[0] for x in states]


@torch.no_grad()
def streamed_logits(reader: CheckpointReader, sequences: list[list[int]], quant=None,
                    routes: dict[int, list] | None = None) -> list[torch.Tensor]:
    """Full-sequence reference logits [T, V] per sequence, holding one decoder layer at a time
    (streamed_hidden, then the output head). What a build uses to record golden outputs."""
    from .quantize import fake_quantize

    hidden = streamed_hidden(reader, sequences, quant, routes)
    head = fake_quantize("lm_head.weight", reader.lm_head(), quant)
    act_block = quant.projection_activation_block("lm_head") if quant is not None else None
    return [(quantize_activations(h, act_block) if act_block else h) @ head.T for h in hidden]


def set_activation_quant(layer: "DecoderLayer", quant) -> None:
    """The activation rounding the quantized bundle's kernels apply, as core/quant.py answers it:
    routed experts (QMoE) per width, and the inputs of every quantized projection (MatMulNBits
    at accuracy_level 4), per block of K."""
    if quant is None:
        return
    if isinstance(layer.mlp, MoE):
        blocks = {s: quant.expert_activation_block(quant.bits_for_expert(layer.layer, e))
                  for s, e in enumerate(layer.mlp.expert_ids)}
        slots = {s for s, b in blocks.items() if b}
        if slots:
            layer.mlp.activation_quant_block = next(blocks[s] for s in slots)
            layer.mlp.activation_quant_slots = slots
    for name, module in layer.named_modules():
        part = _linear_part(name)
        block = quant.projection_activation_block(part) if part and isinstance(module, nn.Linear) else None
        if block:
            quantize_inputs(module, block)


def _linear_part(module_name: str) -> str | None:
    if module_name.startswith("self_attn.") and "kv_b_proj" not in module_name:
        return "attention"
    if module_name.startswith("mlp.shared."):
        return "shared_experts"
    if module_name.startswith("mlp."):
        return "dense_mlp"
    return None


def quantize_inputs(module: nn.Module, block: int) -> None:
    def hook(mod, args):
        return (quantize_activations(args[0], block),)

    module.register_forward_pre_hook(hook)


def iter_reference_tensors(reader: CheckpointReader, quant=None):
    """(reference parameter name, float32 tensor) pairs, one layer at a time (dequantized
    weights where `quant` quantizes them)."""
    from .quantize import fake_quantize

    cfg = reader.config
    D, V = cfg.hidden_size, cfg.vocab_size
    yield "embed_tokens.weight", reader.get("model.embed_tokens.weight", (V, D))
    for i in range(cfg.num_hidden_layers):
        for name, t in layer_tensors(reader, i):
            yield f"layers.{i}.{name}", fake_quantize(name, t, quant, i, cfg.expert_ids(i))
    yield "norm.weight", reader.get("model.norm.weight", (D,))
    yield "lm_head.weight", fake_quantize("lm_head.weight", reader.lm_head(), quant)


def layer_tensors(reader: CheckpointReader, i: int):
    """One decoder layer's weights under reference names, rope rows de-interleaved where needed."""
    cfg = reader.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    p = f"model.layers.{i}."
    perm = rope_deinterleave_permutation(dr) if cfg.rope_interleave else None

    def q_rows(w: torch.Tensor) -> torch.Tensor:  # [H*(dn+dr), in]
        if perm is None:
            return w
        w = w.view(H, dn + dr, -1)
        return torch.cat([w[:, :dn], w[:, dn:][:, perm]], dim=1).reshape(H * (dn + dr), -1)

    def kv_rows(w: torch.Tensor) -> torch.Tensor:  # [r+dr, ...]
        return w if perm is None else torch.cat([w[:r], w[r:][perm]])

    yield "input_layernorm.weight", reader.get(p + "input_layernorm.weight", (D,))
    yield "post_attention_layernorm.weight", reader.get(p + "post_attention_layernorm.weight", (D,))
    a = p + "self_attn."
    if cfg.q_lora_rank is None:
        yield "self_attn.q_proj.weight", q_rows(reader.get(a + "q_proj.weight", (H * (dn + dr), D)))
    else:
        qr = cfg.q_lora_rank
        yield "self_attn.q_a_proj.weight", reader.get(a + "q_a_proj.weight", (qr, D))
        if cfg.attention_bias:
            yield "self_attn.q_a_proj.bias", reader.get(a + "q_a_proj.bias", (qr,))
        yield "self_attn.q_a_layernorm.weight", reader.get(a + "q_a_layernorm.weight", (qr,))
        yield "self_attn.q_b_proj.weight", q_rows(reader.get(a + "q_b_proj.weight", (H * (dn + dr), qr)))
    yield "self_attn.kv_a_proj_with_mqa.weight", kv_rows(reader.get(a + "kv_a_proj_with_mqa.weight", (r + dr, D)))
    if cfg.attention_bias:
        yield "self_attn.kv_a_proj_with_mqa.bias", kv_rows(reader.get(a + "kv_a_proj_with_mqa.bias", (r + dr,)))
        yield "self_attn.o_proj.bias", reader.get(a + "o_proj.bias", (D,))
    yield "self_attn.kv_a_layernorm.weight", reader.get(a + "kv_a_layernorm.weight", (r,))
    yield "self_attn.kv_b_proj.weight", reader.get(a + "kv_b_proj.weight", (H * (dn + dv), r))
    yield "self_attn.o_proj.weight", reader.get(a + "o_proj.weight", (D, H * dv))

    m = p + "mlp."
    if not cfg.is_moe_layer(i):
        inter = cfg.intermediate_size
        yield "mlp.gate_proj.weight", reader.get(m + "gate_proj.weight", (inter, D))
        yield "mlp.up_proj.weight", reader.get(m + "up_proj.weight", (inter, D))
        yield "mlp.down_proj.weight", reader.get(m + "down_proj.weight", (D, inter))
        return
    E, ids = cfg.n_routed_experts, list(cfg.expert_ids(i))
    yield "mlp.router", reader.get(m + "gate.weight", (E, D))[ids]
    if cfg.uses_correction_bias:
        yield "mlp.bias", reader.get(m + "gate.e_score_correction_bias", (E,))[ids]
    gate, up, down = reader.experts(i)
    yield "mlp.w_gate", gate
    yield "mlp.w_up", up
    yield "mlp.w_down", down
    if cfg.n_shared_experts:
        si = cfg.moe_intermediate_size * cfg.n_shared_experts
        s = m + "shared_experts."
        yield "mlp.shared.gate_proj.weight", reader.get(s + "gate_proj.weight", (si, D))
        yield "mlp.shared.up_proj.weight", reader.get(s + "up_proj.weight", (si, D))
        yield "mlp.shared.down_proj.weight", reader.get(s + "down_proj.weight", (D, si))
