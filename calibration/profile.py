"""Expert-routing profile of a checkpoint on calibration text.

For every MoE layer and routed expert, over the calibration tokens:
  selected       tokens routed to it
  weight_mass    sum of the routing weights it received
  contribution   mean over its routed tokens of routing weight x ||expert output||
                 (REAP, Lasby et al. 2025: what removing it takes out of the layer's output)
and which experts were never selected. An expert routed fewer than `min_tokens` tokens is
reported as not covered rather than judged.

The profile is data (this module: torch-free, so `dsexport plan` reads it on a device);
calibration/run.py computes it with the reference model.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np

from dsexport.core.config import ModelConfig
from dsexport.core.errors import UserError
from dsexport.core.files import atomic_write, sha256_file
from dsexport.core.jsonio import Fields, dump_json, load_json

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
        atomic_write(path, dump_json(self.to_json(), indent=1) + "\n")
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


SUMMARY_HEADERS = ["layer", "experts", "never selected", "not covered", "max share", "min share", "max/mean load",
                   "max contribution", "min contribution"]


def load_profile(path: Path) -> Profile:
    """A profile written by `dsexport calibrate`, every value checked."""
    path = Path(path)
    file = path / PROFILE_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no {PROFILE_FILE} (make one with `dsexport calibrate`)")
    f = Fields(load_json(file, UserError), str(file), UserError)
    if f.raw("format", None) != PROFILE_FORMAT or f.raw("schema_version", None) != SCHEMA_VERSION:
        raise UserError(f"{file}: not a dsexport calibration profile of schema {SCHEMA_VERSION}")
    layers = []
    for d in f.objs("layers", max_len=1024):
        ids = list(d.ints("expert_ids", lo=0, hi=1 << 14, max_len=1 << 14))
        selected = list(d.ints("selected", lo=0, hi=1 << 50, max_len=1 << 14))
        mass = [float(v) for v in d.list("weight_mass", max_len=1 << 14)]
        contribution = [float(v) for v in d.list("contribution", max_len=1 << 14)]
        if not len(ids) == len(selected) == len(mass) == len(contribution):
            d.fail("expert_ids, selected, weight_mass and contribution differ in length")
        layers.append(LayerProfile(d.int("layer", lo=0, hi=1024), ids, selected, mass, contribution))
    model = f.mapping("model")
    for key in ("num_hidden_layers", "n_routed_experts"):
        if not isinstance(model.get(key), int):
            f.fail(f"model.{key} is missing")
    return Profile(model, f.list("data", []), f.int("samples", lo=0), f.int("seq_len", lo=0), f.int("tokens", lo=0),
                   f.int("min_tokens", lo=0), f.float("seconds", 0.0, lo=0.0), layers)


def model_identity(directory: Path, cfg: ModelConfig) -> dict:
    return {"checkpoint": Path(directory).resolve().name, "config_sha256": sha256_file(Path(directory) / "config.json"),
            "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
