"""Shared, cached fixtures: random tiny checkpoints written by transformers, and their exports.

Each (variant, seed) checkpoint and each export is made once per test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores here: keep torch from oversubscribing them alongside ONNX Runtime.
os.environ.setdefault("OMP_NUM_THREADS", "2")

VARIANTS = ("v2_greedy", "v2_group_limited", "v3_noaux_tc", "v3_flat_tied")
SEEDS = (0, 1)


class Artifacts:
    def __init__(self, root: Path):
        self.root = root
        self._hf = {}

    def checkpoint(self, variant: str, seed: int = 0) -> Path:
        from dsexport.exporter.synthetic import write_checkpoint

        path = self.root / f"ckpt_{variant}_{seed}"
        if not (path / "config.json").is_file():
            write_checkpoint(path, variant, seed=seed)
        return path

    def export(self, variant: str, seed: int = 0, lowering: str = "ort-moe") -> Path:
        """A bundle for the x86-cpu target, with its MoE lowering or another one."""
        from dsexport.build import BuildConfig, build_bundle

        path = self.root / f"export_{variant}_{seed}_{lowering}"
        if not (path / "manifest.json").is_file():
            build_bundle(BuildConfig(self.checkpoint(variant, seed), path, moe_lowering=lowering))
        return path

    def export_target(self, variant: str, seed: int = 0, target: str = "jetson-orin-nano-8gb") -> Path:
        """A bundle of the checkpoint built for another target (e.g. a TensorRT one)."""
        from dsexport.build import BuildConfig, build_bundle

        path = self.root / f"export_{variant}_{seed}_{target}"
        if not (path / "manifest.json").is_file():
            build_bundle(BuildConfig(self.checkpoint(variant, seed), path, target=target))
        return path

    def hf_model(self, variant: str, seed: int = 0):
        """transformers' own DeepseekV2/V3ForCausalLM loaded from the checkpoint: the oracle."""
        key = (variant, seed)
        if key not in self._hf:
            import torch
            from transformers import AutoModelForCausalLM

            self._hf[key] = AutoModelForCausalLM.from_pretrained(self.checkpoint(variant, seed), dtype=torch.float32).eval()
        return self._hf[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("dsexport"))


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the real `dsexport` entry point in-process: run_cli(*args) -> (exit code, stdout, stderr)."""
    import sys

    from dsexport.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["dsexport", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run
