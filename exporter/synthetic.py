"""Random DeepSeek checkpoints written by transformers itself, for tests and benchmarks.

The model hub is out of reach here, so tests make their own checkpoints: a tiny config of each
routing method and attention variant, random weights at a scale where routing and greedy
decoding have clear margins, saved with `save_pretrained` (per-expert safetensors keys, as
DeepSeek releases them), plus a real byte-level BPE tokenizer trained with `tokenizers`.
Needs transformers (the `test` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Variants cover every branch real configs use: q-LoRA on/off, rope interleave on/off, YaRN
# with mscale, dense first layers, shared experts, the three routing methods, tied embeddings.
_BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
    beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
)
VARIANTS: dict[str, dict] = {
    # DeepSeek-V2-Lite shape: no q-LoRA, greedy softmax, YaRN.
    "v2_greedy": dict(model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=8, topk_method="greedy",
                      rope_parameters=_YARN),
    # DeepSeek-V2 shape: q-LoRA, group-limited greedy, two dense layers, plain rope.
    "v2_group_limited": dict(model_type="deepseek_v2", q_lora_rank=24, n_routed_experts=8, n_group=4,
                             topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=2,
                             num_hidden_layers=4, n_shared_experts=2, routed_scaling_factor=1.5),
    # DeepSeek-V3 shape: q-LoRA, noaux_tc with groups and a correction bias, YaRN, interleaved rope.
    "v3_noaux_tc": dict(model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=16, n_group=4, topk_group=2,
                        num_experts_per_tok=3, routed_scaling_factor=2.5, norm_topk_prob=True,
                        rope_interleave=True, rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # Moonlight-like V3: one group, no q-LoRA, not interleaved, unnormalized weights, tied embeddings.
    "v3_flat_tied": dict(model_type="deepseek_v3", q_lora_rank=None, n_routed_experts=8, n_group=1, topk_group=1,
                         norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=False,
                         tie_word_embeddings=True),
}

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Experts are routed by a gate; only the chosen ones run. Latent attention keeps the cache small. "
    "Edge devices have little memory and less bandwidth, so every byte read per token counts. "
)


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (the kind DeepSeek ships) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 20, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template,
    }, indent=2))


def build_hf_model(variant: str | dict, seed: int = 0, scale: float = 0.15, **overrides):
    """A transformers DeepseekV2/V3ForCausalLM with random weights of std `scale`."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    spec = {**_BASE, **(VARIANTS[variant] if isinstance(variant, str) else variant), **overrides}
    model_type = spec.pop("model_type")
    cfg_cls, model_cls = (
        (DeepseekV3Config, DeepseekV3ForCausalLM) if model_type == "deepseek_v3" else (DeepseekV2Config, DeepseekV2ForCausalLM)
    )
    config = cfg_cls(**spec)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Default init (std 0.02) leaves routers and logits nearly flat, so tiny float differences
    # flip top-k choices; a larger scale gives clear margins. Norm weights stay near 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, scale)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def write_checkpoint(out_dir: str | Path, variant: str | dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                     scale: float = 0.15, **overrides) -> Path:
    """Write a random checkpoint directory (config.json, safetensors, tokenizer) and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(variant, seed=seed, scale=scale, **overrides)
    model.to(dtype).save_pretrained(out)
    train_tokenizer(out, min(model.config.vocab_size, 320))
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a random tiny DeepSeek checkpoint with transformers.")
    ap.add_argument("out", help="directory to write")
    ap.add_argument("--variant", default="v3_noaux_tc", choices=sorted(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = write_checkpoint(args.out, args.variant, seed=args.seed)
    print(f"wrote {args.variant} checkpoint (random weights) to {path}")


if __name__ == "__main__":
    main()
