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

import os
from pathlib import Path

import torch

from dsexport.core.errors import CheckpointError

from dsexport.core.config import ModelConfig, load_config
from dsexport.core.safetensors import checkpoint_tensors, read_header

FP8_BLOCK = 128
_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """Reads one tensor at a time with pread: no memory map, so the pages of tensors already
    exported do not stay resident (a mapped file would count in RSS for the whole build). The
    header is checked first (core/safetensors.py: dtypes, shapes, offsets tiling the file)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e.strerror or e})") from None
        header = read_header(path, self._fd)
        self._base = header.data_offset
        self._entries = header.tensors

    def keys(self):
        return self._entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        data = bytearray(entry.nbytes)
        view = memoryview(data)
        done = 0
        while done < len(data):
            n = os.preadv(self._fd, [view[done:]], self._base + entry.start + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
            done += n
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {entry.dtype}, which dsexport does not read")
        dtype = _DTYPES[entry.dtype]
        if not data:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class CheckpointReader:
    """Random access to the tensors of a checkpoint by name, without loading the whole model.

    Views of the same files (`with_config`, `with_merges`, `with_awq`) read the model a bundle
    holds: kept experts only, removed experts merged into kept ones (exporter/merge.py), MoE
    layers rescaled (exporter/awq.py); `original()` is the checkpoint as released."""

    merges: dict | None = None  # layer -> (ExpertMerge, ...)
    awq: dict | None = None  # layer -> (input scale [D], down scale [E, I])

    def __init__(self, checkpoint_dir: str | Path, config: ModelConfig | None = None):
        self.dir = Path(checkpoint_dir)
        if not self.dir.exists():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist")
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory (pass the checkpoint directory)")
        self.config = config or load_config(self.dir)
        self._handles: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, Path] = self._index()

    def with_config(self, config: ModelConfig) -> "CheckpointReader":
        """The same checkpoint read under another config (e.g. with kept experts): a view that shares
        the open files, so nothing is re-read and the original reader is unchanged."""
        return self._view(config=config)

    # ---- index --------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        where = checkpoint_tensors(self.dir)
        if not where:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        return where

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = SafetensorsFile(file)
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
        handle = self._open(self._where[name])
        if name not in handle.keys():
            raise CheckpointError(f"{handle.path}: the index lists {name!r} but the file does not hold it")
        return handle.get_tensor(name)

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
        if self.awq:
            from .awq import rescaled_tensor

            t = rescaled_tensor(self.awq, name, t)
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
        """Stacked weights of the routed experts the config keeps in a layer, in order:
        gate [E, I, H], up [E, I, H], down [E, H, I]."""
        ids = list(self.config.expert_ids(layer))
        gate, up, down = self._stacked(layer, ids)
        if self.merges:
            from .merge import merge_experts  # scipy: only when a bundle merges experts

            for m in self.merges.get(layer, ()):
                slot = ids.index(m.into)
                sources = [(self.expert(layer, e), w) for e, w in m.sources]
                gate[slot], up[slot], down[slot] = merge_experts((gate[slot], up[slot], down[slot]), sources, m.weight)
        if self.awq:
            from .awq import rescaled_experts

            gate, up, down = rescaled_experts(self.awq, layer, gate, up, down)
        return gate, up, down

    def expert(self, layer: int, expert_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One routed expert by its original id, kept or not: gate [I, H], up [I, H], down [H, I]."""
        gate, up, down = self._stacked(layer, [expert_id])
        return gate[0], up[0], down[0]

    def _stacked(self, layer: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        E_all, inter, hidden = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        prefix = f"model.layers.{layer}.mlp.experts."
        if prefix + "gate_up_proj" in self:
            gate_up = self.get(prefix + "gate_up_proj", (E_all, 2 * inter, hidden))[ids]
            down = self.get(prefix + "down_proj", (E_all, hidden, inter))[ids]
            return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous(), down
        gate = torch.empty(len(ids), inter, hidden)
        up = torch.empty(len(ids), inter, hidden)
        down = torch.empty(len(ids), hidden, inter)
        for slot, e in enumerate(ids):
            gate[slot] = self.get(f"{prefix}{e}.gate_proj.weight", (inter, hidden))
            up[slot] = self.get(f"{prefix}{e}.up_proj.weight", (inter, hidden))
            down[slot] = self.get(f"{prefix}{e}.down_proj.weight", (hidden, inter))
        return gate, up, down

    def original(self) -> "CheckpointReader":
        """The checkpoint as released: every expert, nothing merged or rescaled."""
        return self._view(config=self.config.unpruned(), merges=None, awq=None)

    def with_merges(self, merges: dict | None) -> "CheckpointReader":
        """Kept experts that absorbed removed ones ({layer: (ExpertMerge, ...)}, a pruning record
        with method merge)."""
        return self._view(merges=merges or None)

    def with_awq(self, scales: dict | None) -> "CheckpointReader":
        """MoE layers rescaled by AWQ scales ({layer: (input [D], down [E, I])})."""
        return self._view(awq=scales or None)

    def _view(self, **changes) -> "CheckpointReader":
        view = object.__new__(CheckpointReader)
        view.__dict__.update(self.__dict__)
        view.__dict__.update(changes)
        return view

    def lm_head(self) -> torch.Tensor:
        cfg = self.config
        if cfg.tie_word_embeddings or "lm_head.weight" not in self:
            return self.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        return self.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))


def open_checkpoint(checkpoint_dir: str | Path) -> CheckpointReader:
    return CheckpointReader(checkpoint_dir)
