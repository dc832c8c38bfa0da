"""Expert-routing profile of a checkpoint on calibration text.

For every MoE layer and routed expert, over the calibration tokens:
  selected       tokens routed to it
  weight_mass    sum of the routing weights it received
  contribution   mean over its routed tokens of routing weight x ||expert output||
                 (REAP, Lasby et al. 2025: what removing it takes out of the layer's output)
and which experts were never selected. An expert routed fewer than `min_tokens` tokens is
reported as not covered rather than judged.

The run streams the reference model layer by layer over all sequences (as
exporter/reference.py: streamed_logits): memory is one decoder layer plus the hidden states of
the calibration tokens, whatever the model's depth. No logits are computed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dsexport.errors import UserError
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DecoderLayer, layer_tensors, positions_and_mask
from dsexport.exporter.rope import rope_frequencies
from dsexport.runtime.bundle import sha256_file
from dsexport.runtime.tokenizer import BundleTokenizer

from .data import load_sequences

PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "dsexport-calibration"
SCHEMA_VERSION = 1
MIN_TOKENS = 8  # below this an expert's contribution is noise: reported as not covered


@dataclasses.dataclass
class LayerProfile:
    layer: int
    expert_ids: list[int]  # original ids, in slot order
    selected: list[int]
    weight_mass: list[float]
    contribution: list[float]  # mean over routed tokens (0 when never selected)

    def never_selected(self) -> list[int]:
        return [e for e, n in zip(self.expert_ids, self.selected) if n == 0]

    def not_covered(self, min_tokens: int) -> list[int]:
        return [e for e, n in zip(self.expert_ids, self.selected) if n < min_tokens]


@dataclasses.dataclass
class Profile:
    model: dict
    data: list[dict]
    samples: int
    seq_len: int
    tokens: int
    min_tokens: int
    seconds: float
    layers: list[LayerProfile]

    def layer(self, i: int) -> LayerProfile:
        for lp in self.layers:
            if lp.layer == i:
                return lp
        raise KeyError(i)

    def to_json(self) -> dict:
        return {
            "format": PROFILE_FORMAT, "schema_version": SCHEMA_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model, "data": self.data, "samples": self.samples, "seq_len": self.seq_len,
            "tokens": self.tokens, "min_tokens": self.min_tokens, "seconds": round(self.seconds, 2),
            "layers": [{**dataclasses.asdict(lp), "never_selected": lp.never_selected(),
                        "not_covered": lp.not_covered(self.min_tokens)} for lp in self.layers],
        }

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PROFILE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    def summary_rows(self) -> list[list]:
        rows = []
        for lp in self.layers:
            sel = np.asarray(lp.selected, float)
            share = sel / max(sel.sum(), 1)
            rows.append([lp.layer, len(lp.expert_ids), len(lp.never_selected()), len(lp.not_covered(self.min_tokens)),
                         f"{share.max():.3f}", f"{share.min():.3f}",
                         f"{sel.max() / max(sel.mean(), 1e-9):.2f}",
                         f"{np.asarray(lp.contribution).max():.3g}", f"{np.asarray(lp.contribution).min():.3g}"])
        return rows


SUMMARY_HEADERS = ["layer", "experts", "never selected", f"not covered", "max share", "min share", "max/mean load",
                   "max contribution", "min contribution"]


def load_profile(path: Path) -> Profile:
    path = Path(path)
    file = path / PROFILE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {PROFILE_FILE} (make one with `dsexport calibrate`)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if data.get("format") != PROFILE_FORMAT or data.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{file}: not a dsexport calibration profile of schema {SCHEMA_VERSION}")
    layers = [LayerProfile(d["layer"], d["expert_ids"], d["selected"], d["weight_mass"], d["contribution"])
              for d in data["layers"]]
    return Profile(data["model"], data["data"], data["samples"], data["seq_len"], data["tokens"],
                   data["min_tokens"], data["seconds"], layers)


def model_identity(reader: CheckpointReader) -> dict:
    cfg = reader.config
    return {"checkpoint": reader.dir.resolve().name, "config_sha256": sha256_file(reader.dir / "config.json"),
            "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok}


class _Recorder:
    def __init__(self, experts: int):
        self.selected = torch.zeros(experts, dtype=torch.float64)
        self.mass = torch.zeros(experts, dtype=torch.float64)
        self.contribution = torch.zeros(experts, dtype=torch.float64)

    def __call__(self, slot: int, weights: torch.Tensor, norms: torch.Tensor) -> None:
        self.selected[slot] += weights.numel()
        self.mass[slot] += weights.double().sum()
        self.contribution[slot] += (weights.double() * norms.double()).sum()


@torch.no_grad()
def calibrate(model_dir: Path, data: list[Path], samples: int = 128, seq_len: int = 256,
              min_tokens: int = MIN_TOKENS,
              progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> Profile:
    start = time.perf_counter()
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise UserError(f"{model_dir}: the model has no MoE layers to calibrate")
    tokenizer = BundleTokenizer(reader.dir)
    sequences, sources = load_sequences(data, tokenizer, samples, seq_len)
    if max(max(s) for s in sequences) >= cfg.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer gives ids beyond the model's vocabulary ({cfg.vocab_size})")
    inv_freq, rope_scale = rope_frequencies(cfg)
    # same-length sequences run as one batch (plain-text windows are all seq_len long)
    by_length: dict[int, list[int]] = {}
    for n, s in enumerate(sequences):
        by_length.setdefault(len(s), []).append(n)
    embed = reader.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    batches = [(idx, embed[torch.tensor([sequences[n] for n in idx])]) for idx in by_length.values()]  # [B, T, D]
    del embed
    rope = {T: positions_and_mask(inv_freq, rope_scale, (1, T), 0, None, None) for T in by_length}
    layers = []
    total = cfg.num_hidden_layers
    for i in range(total):
        progress("calibrate", i, total)
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        layer.load_state_dict(dict(layer_tensors(reader, i)), strict=True, assign=True)
        recorder = None
        if cfg.is_moe_layer(i):
            recorder = layer.mlp.recorder = _Recorder(cfg.num_experts(i))
        for b, (idx, x) in enumerate(batches):
            cos, sin, mask = rope[x.shape[1]]
            for c in range(0, x.shape[0], 16):  # bounded activations: 16 sequences per call
                x[c:c + 16] = layer(x[c:c + 16], cos, sin, mask, None)
        del layer
        if recorder is not None:
            sel = recorder.selected
            layers.append(LayerProfile(i, list(cfg.expert_ids(i)), [int(v) for v in sel.tolist()],
                                       recorder.mass.tolist(),
                                       (recorder.contribution / sel.clamp(min=1)).tolist()))
    progress("calibrate", total, total)
    return Profile(model_identity(reader), [dataclasses.asdict(s) for s in sources], len(sequences), seq_len,
                   sum(len(s) for s in sequences), min_tokens, time.perf_counter() - start, layers)
