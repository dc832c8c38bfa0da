"""Calibration: run text through the reference model and record, per MoE layer and routed expert,
how often it is selected, the routing weight it receives and what it contributes
(calibration/profile.py holds the result).

The run streams the reference model layer by layer over all sequences (as
exporter/reference.py: streamed_logits): memory is one decoder layer plus the hidden states of
the calibration tokens, whatever the model's depth. No logits are computed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from dsexport.core.errors import UserError
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DecoderLayer, layer_tensors, positions_and_mask
from dsexport.exporter.rope import rope_frequencies
from dsexport.runtime.tokenizer import BundleTokenizer

from .data import load_sequences
from .profile import MIN_TOKENS, LayerProfile, Profile, model_identity


class _Recorder:
    def __init__(self, experts: int):
        self.selected = torch.zeros(experts, dtype=torch.float64)
        self.mass = torch.zeros(experts, dtype=torch.float64)
        self.contribution = torch.zeros(experts, dtype=torch.float64)

    def __call__(self, slot: int, weights: torch.Tensor, norms: torch.Tensor) -> None:
        self.selected[slot] += weights.numel()
        self.mass[slot] += weights.double().sum()
        self.contribution[slot] += (weights.double() * norms.double()).sum()


def token_batches(reader: CheckpointReader, sequences: list[list[int]]) -> tuple[list, dict]:
    """The sequences embedded, same-length ones as one batch ([(sequence indices, [B, T, D])]), and
    rope cos/sin/mask per length: the state a layer-by-layer pass carries from layer to layer."""
    cfg = reader.config
    inv_freq, rope_scale = rope_frequencies(cfg)
    by_length: dict[int, list[int]] = {}
    for n, s in enumerate(sequences):
        by_length.setdefault(len(s), []).append(n)
    embed = reader.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    batches = [(idx, embed[torch.tensor([sequences[n] for n in idx])]) for idx in by_length.values()]  # [B, T, D]
    rope = {T: positions_and_mask(inv_freq, rope_scale, (1, T), 0, None, None) for T in by_length}
    return batches, rope


def load_layer(reader: CheckpointReader, i: int) -> DecoderLayer:
    """One decoder layer, its weights assigned from the reader (no second copy)."""
    with torch.device("meta"):
        layer = DecoderLayer(reader.config, i)
    layer.load_state_dict(dict(layer_tensors(reader, i)), strict=True, assign=True)
    return layer


def run_layer(layer: DecoderLayer, batches: list, rope: dict) -> None:
    """The hidden states of every batch through one layer, in place, 16 sequences per call."""
    for _, x in batches:
        cos, sin, mask = rope[x.shape[1]]
        for c in range(0, x.shape[0], 16):  # bounded activations
            x[c:c + 16] = layer(x[c:c + 16], cos, sin, mask, None)


@torch.no_grad()
def calibrate(model_dir: Path, data: list[Path], samples: int = 128, seq_len: int = 256,
              min_tokens: int = MIN_TOKENS,
              progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> Profile:
    start = time.perf_counter()
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise UserError(f"{model_dir}: the model has no MoE layers to calibrate")
    tokenizer = BundleTokenizer.from_directory(reader.dir)
    sequences, sources = load_sequences(data, tokenizer, samples, seq_len)
    if max(max(s) for s in sequences) >= cfg.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer gives ids beyond the model's vocabulary ({cfg.vocab_size})")
    batches, rope = token_batches(reader, sequences)
    layers = []
    total = cfg.num_hidden_layers
    for i in range(total):
        progress("calibrate", i, total)
        layer = load_layer(reader, i)
        recorder = None
        if cfg.is_moe_layer(i):
            recorder = layer.mlp.recorder = _Recorder(cfg.num_experts(i))
        run_layer(layer, batches, rope)
        del layer
        if recorder is not None:
            sel = recorder.selected
            layers.append(LayerProfile(i, list(cfg.expert_ids(i)), [int(v) for v in sel.tolist()],
                                       recorder.mass.tolist(),
                                       (recorder.contribution / sel.clamp(min=1)).tolist()))
    progress("calibrate", total, total)
    return Profile(model_identity(reader.dir, cfg), [dataclasses.asdict(s) for s in sources], len(sequences), seq_len,
                   sum(len(s) for s in sequences), min_tokens, time.perf_counter() - start, layers)
