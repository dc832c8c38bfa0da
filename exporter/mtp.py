"""DeepSeek-V3's multi-token-prediction (MTP) module, depth 1, as the released weights lay it out.

Weights live under the layer index after the last decoder layer (`model.layers.{L}` with
L = num_hidden_layers; 61 for V3): `enorm`, `hnorm`, `eh_proj` [D, 2D], a full decoder layer
(MLA + MoE), and `shared_head.norm`; the embedding and the output head are the main model's
(README_WEIGHTS.md: "shares parameters"; the release also stores copies, which are not read).

Used as vLLM and SGLang use it: for token t, with h_t the main model's hidden state after its
final norm and t+1 the next token,

    x = eh_proj(concat[enorm(embed(t+1)), hnorm(h_t)])   # embedding first
    logits(t+2) = head(shared_head.norm(block(x)))        # block at the position of t

DeepSeek has not published which hidden state (before or after the final norm) training used;
both engines feed the normalized one, so dsexport does too (see docs/mtp.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointReader
from dsexport.core.config import ModelConfig
from .reference import DecoderLayer, DeepseekReference, LatentCache, RMSNorm, layer_tensors, positions_and_mask


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.layer_index = cfg.num_hidden_layers
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = DecoderLayer(cfg, self.layer_index)
        self.shared_head_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, main: DeepseekReference, hidden: torch.Tensor, next_ids: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        """hidden [B, T, D] of tokens t, next_ids [B, T] = tokens t+1 -> logits [B, T, V] for t+2."""
        x = torch.cat([self.enorm(main.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1)
        x = self.block(self.eh_proj(x), cos, sin, mask, cache)
        return main.lm_head(self.shared_head_norm(x))

    def predict(self, main: DeepseekReference, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence MTP logits without a cache; positions 0..T-1 are those of tokens t."""
        cos, sin, mask = positions_and_mask(main.inv_freq, main.rope_scale, next_ids.shape, 0, None, None)
        return self(main, hidden, next_ids, cos, sin, mask)

    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader) -> "MTPModule | None":
        """The checkpoint's MTP module, or None when it has none."""
        cfg = reader.config
        L = cfg.num_hidden_layers
        if f"model.layers.{L}.eh_proj.weight" not in reader:
            return None
        D = cfg.hidden_size
        with torch.device("meta"):
            mtp = cls(cfg)
        state = {f"block.{name}": t for name, t in layer_tensors(reader, L)}
        state["enorm.weight"] = reader.get(f"model.layers.{L}.enorm.weight", (D,))
        state["hnorm.weight"] = reader.get(f"model.layers.{L}.hnorm.weight", (D,))
        state["eh_proj.weight"] = reader.get(f"model.layers.{L}.eh_proj.weight", (D, 2 * D))
        state["shared_head_norm.weight"] = reader.get(f"model.layers.{L}.shared_head.norm.weight", (D,))
        mtp.load_state_dict(state, strict=True, assign=True)
        return mtp.eval()
