"""Write a reference model (and its MTP module) as a Hugging Face DeepSeek checkpoint.

The inverse of reference.layer_tensors: per-expert keys, router as `mlp.gate.weight` with
`e_score_correction_bias`, rope rows re-interleaved when the config says the checkpoint is
interleaved, MTP weights under `model.layers.{num_hidden_layers}` as DeepSeek's release does
(including its copies of the shared embedding and head). What the training script saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsexport.core.config import ModelConfig
from .rope import rope_deinterleave_permutation


def _interleave_rows(cfg: ModelConfig):
    if not cfg.rope_interleave:
        return (lambda w: w), (lambda w: w)
    H, dn, dr, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    inverse = torch.argsort(rope_deinterleave_permutation(dr))

    def q_rows(w):
        w = w.view(H, dn + dr, -1)
        return torch.cat([w[:, :dn], w[:, dn:][:, inverse]], dim=1).reshape(H * (dn + dr), -1)

    def kv_rows(w):
        return torch.cat([w[:r], w[r:][inverse]])

    return q_rows, kv_rows


def layer_state(cfg: ModelConfig, layer: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """HF tensors of one reference DecoderLayer."""
    q_rows, kv_rows = _interleave_rows(cfg)
    out = {}
    for name, t in layer.state_dict().items():
        t = t.detach()
        if name in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
            t = q_rows(t)
        elif name.startswith("self_attn.kv_a_proj_with_mqa."):
            t = kv_rows(t)
        if name == "mlp.router":
            out[prefix + "mlp.gate.weight"] = t
        elif name == "mlp.bias":
            out[prefix + "mlp.gate.e_score_correction_bias"] = t
        elif name in ("mlp.w_gate", "mlp.w_up", "mlp.w_down"):
            proj = {"mlp.w_gate": "gate_proj", "mlp.w_up": "up_proj", "mlp.w_down": "down_proj"}[name]
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{proj}.weight"] = t[e]
        elif name.startswith("mlp.shared."):
            out[prefix + "mlp.shared_experts." + name[len("mlp.shared."):]] = t
        else:
            out[prefix + name] = t
    return out


def save_hf_checkpoint(model, mtp, raw_config: dict, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """config.json (as given) + model.safetensors with DeepSeek's key layout."""
    cfg: ModelConfig = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight.detach(),
               "model.norm.weight": model.norm.weight.detach()}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.detach()
    for i, layer in enumerate(model.layers):
        tensors.update(layer_state(cfg, layer, f"model.layers.{i}."))
    if mtp is not None:
        p = f"model.layers.{cfg.num_hidden_layers}."
        tensors.update(layer_state(cfg, mtp.block, p))
        tensors.update({p + "enorm.weight": mtp.enorm.weight.detach(), p + "hnorm.weight": mtp.hnorm.weight.detach(),
                        p + "eh_proj.weight": mtp.eh_proj.weight.detach(),
                        p + "shared_head.norm.weight": mtp.shared_head_norm.weight.detach(),
                        p + "embed_tokens.weight": model.embed_tokens.weight.detach(),
                        p + "shared_head.head.weight": model.lm_head.weight.detach()})
    tensors = {k: v.to(dtype).contiguous().clone() for k, v in tensors.items()}  # shared storage is not allowed
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    return out
