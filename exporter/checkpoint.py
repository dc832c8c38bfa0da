"""Stream tensors out of a Hugging Face DeepSeek checkpoint directory, one at a time.

Handles a single model.safetensors, shards with model.safetensors.index.json, or shards with no
index; per-expert keys (`mlp.experts.E.gate_proj.weight`) and the stacked layout that
transformers 5 uses in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]); bf16 / fp16 / fp32 sources; and DeepSeek-V3/R1's FP8 e4m3 weights with 128x128
`weight_scale_inv` block scales, dequantized on read. Every tensor comes back as float32.

Nothing in the checkpoint directory is executed: modeling_*.py files shipped for
trust_remote_code are never imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dsexport.errors import CheckpointError

from .config import ModelConfig, load_config

FP8_BLOCK = 128


class CheckpointReader:
    """Random access to the tensors of a checkpoint by name, without loading the whole model."""

    def __init__(self, checkpoint_dir: str | Path, config: ModelConfig | None = None):
        self.dir = Path(checkpoint_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self.config = config or load_config(self.dir)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = self._index()

    # ---- index --------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        index_path = self.dir / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
            where = {name: self.dir / file for name, file in weight_map.items()}
            for file in sorted(set(where.values())):
                if not file.is_file():
                    raise CheckpointError(f"{file}: listed in {index_path.name} but missing")
            return where
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        where = {}
        for file in files:
            for name in self._open(file).keys():
                where[name] = file
        return where

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
            self._handles[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    # ---- tensors ------------------------------------------------------------------------
    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (any dtype)."""
        if name not in self._where:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        file = self._where[name]
        try:
            return self._open(file).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor as float32, FP8 block scales applied; `shape` is checked when given."""
        t = self.raw(name)
        if t.dtype == torch.float8_e4m3fn:
            t = self._dequant_fp8(name, t)
        elif t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected a float type")
        t = t.to(torch.float32)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} from config.json"
            )
        return t

    def _dequant_fp8(self, name: str, w: torch.Tensor) -> torch.Tensor:
        scale_name = name + "_scale_inv"  # "....weight" -> "....weight_scale_inv"
        if scale_name not in self._where:
            raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r} block scales")
        s = self.raw(scale_name).to(torch.float32)
        rows, cols = w.shape
        want = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        if tuple(s.shape) != want:
            raise CheckpointError(f"tensor {scale_name!r} has shape {list(s.shape)}, expected {list(want)}")
        # DeepSeek's weight_dequant: w * s, each scale covering a 128x128 block (edges partial).
        s_full = s.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
        return w.to(torch.float32) * s_full

    # ---- experts ------------------------------------------------------------------------
    def experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked routed-expert weights of a layer: gate [E, I, H], up [E, I, H], down [E, H, I]."""
        cfg = self.config
        E, inter, hidden = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        prefix = f"model.layers.{layer}.mlp.experts."
        if prefix + "gate_up_proj" in self:
            gate_up = self.get(prefix + "gate_up_proj", (E, 2 * inter, hidden))
            down = self.get(prefix + "down_proj", (E, hidden, inter))
            return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous(), down
        gate = torch.empty(E, inter, hidden)
        up = torch.empty(E, inter, hidden)
        down = torch.empty(E, hidden, inter)
        for e in range(E):
            gate[e] = self.get(f"{prefix}{e}.gate_proj.weight", (inter, hidden))
            up[e] = self.get(f"{prefix}{e}.up_proj.weight", (inter, hidden))
            down[e] = self.get(f"{prefix}{e}.down_proj.weight", (hidden, inter))
        return gate, up, down

    def lm_head(self) -> torch.Tensor:
        cfg = self.config
        if cfg.tie_word_embeddings or "lm_head.weight" not in self:
            return self.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        return self.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))


def open_checkpoint(checkpoint_dir: str | Path) -> CheckpointReader:
    return CheckpointReader(checkpoint_dir)
