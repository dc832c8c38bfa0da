"""The distilled student as a Hugging Face checkpoint directory (calibration/distill.py).

- config.json: the original's, plus `kept_experts` (per decoder layer, the original ids kept;
  [] for dense layers), which dsexport's build and validate read.
- model.safetensors (shards and an index past `shard_bytes`): every tensor of the original
  checkpoint under its own name. A tensor the student changed (trained, or merged by the reader
  view) is written at `save_dtype` (float32 by default: what was trained is what a build reads);
  every other one is copied byte for byte. Removed experts' weights stay as they were. Under
  noaux_tc routing (DeepSeek-V3) their `e_score_correction_bias` entries are set to
  REMOVED_BIAS, so runtimes that ignore `kept_experts` (transformers, vLLM) never select them
  either; an FP8 tensor that is replaced loses its `_scale_inv` (the replacement is not FP8).
- the tokenizer files (regular files inside the checkpoint only, never a symlink out of it).
- distill_report.json: teacher identity, settings, plan, data and the quality report; it also
  marks the directory as a distill output, the only kind `--overwrite` replaces.

Tensors are streamed: one tensor in memory at a time besides the student.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from dsexport.core.errors import CheckpointError
from dsexport.core.files import copy_regular_file, is_marked_output
from dsexport.core.jsonio import load_json
from dsexport.core.safetensors import checkpoint_tensors, read_header
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.hf_format import layer_state
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime.tokenizer import TOKENIZER_FILES

REPORT_FILE = "distill_report.json"
REPORT_FORMAT = "dsexport-distill"
# Added to a removed expert's sigmoid score (0..1) it can never be picked; a group holding only
# removed experts then scores about -2e4 and one holding a single kept expert about -1e4 (below
# every fuller group: see docs/distill.md on groups of one). Exact in bf16 and fp16.
REMOVED_BIAS = -1.0e4
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _expert_key(name: str, ids: tuple[int, ...]) -> str:
    """`...mlp.experts.{slot}.proj.weight` (layer_state counts slots) -> the original expert id."""
    head, _, rest = name.partition(".mlp.experts.")
    slot, _, proj = rest.partition(".")
    return f"{head}.mlp.experts.{ids[int(slot)]}.{proj}"


def _full_rows(reader: CheckpointReader, name: str, rows: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """The checkpoint's [E, ...] tensor with the kept experts' rows replaced."""
    full = reader.get(name).clone()
    full[list(ids)] = rows
    return full


def student_tensors(reader: CheckpointReader, model: DeepseekReference, removed_bias: bool) -> dict[str, torch.Tensor]:
    """{checkpoint name: new float32 tensor} for every tensor the student holds differently from
    the checkpoint (untouched ones are left out). removed_bias: set removed experts' correction
    bias to REMOVED_BIAS (noaux_tc)."""
    cfg = model.cfg
    new: dict[str, torch.Tensor] = {"model.norm.weight": model.norm.weight.detach().cpu()}
    for i, layer in enumerate(model.layers):
        prefix, ids = f"model.layers.{i}.", cfg.expert_ids(i)
        for name, t in layer_state(cfg, layer, prefix).items():
            t = t.cpu()
            if ".mlp.experts." in name:
                new[_expert_key(name, ids)] = t
            elif name.endswith("mlp.gate.weight"):
                new[name] = _full_rows(reader, name, t, ids)
            elif name.endswith("mlp.gate.e_score_correction_bias"):
                full = _full_rows(reader, name, t, ids)
                if removed_bias:
                    full[[e for e in range(cfg.n_routed_experts) if e not in ids]] = REMOVED_BIAS
                new[name] = full
            else:
                new[name] = t
    _stack_experts(reader, cfg, new)
    return {name: t.float() for name, t in new.items() if not torch.equal(t.float(), reader.get(name))}


def _stack_experts(reader: CheckpointReader, cfg, new: dict[str, torch.Tensor]) -> None:
    """Checkpoints in transformers' stacked layout (`experts.gate_up_proj` [E, 2I, H],
    `experts.down_proj` [E, H, I]): fold the per-expert tensors into them."""
    for i in cfg.moe_layers:
        prefix = f"model.layers.{i}.mlp.experts."
        if prefix + "gate_up_proj" not in reader:
            continue
        gate_up, down = reader.get(prefix + "gate_up_proj").clone(), reader.get(prefix + "down_proj").clone()
        inter = cfg.moe_intermediate_size
        for e in cfg.expert_ids(i):
            gate_up[e, :inter] = new.pop(f"{prefix}{e}.gate_proj.weight")
            gate_up[e, inter:] = new.pop(f"{prefix}{e}.up_proj.weight")
            down[e] = new.pop(f"{prefix}{e}.down_proj.weight")
        new[prefix + "gate_up_proj"], new[prefix + "down_proj"] = gate_up, down


def _plan_tensors(reader: CheckpointReader, replaced: dict[str, torch.Tensor], dtype: torch.dtype) -> list[tuple]:
    """(name, safetensors dtype, shape, source) in the checkpoint's order: source is a tensor to
    write, or (file, offset, bytes) to copy."""
    where = checkpoint_tensors(reader.dir)
    headers = {f: read_header(f) for f in sorted(set(where.values()))}
    dropped = {name + "_scale_inv" for name in replaced}  # FP8 block scales of replaced tensors
    missing = set(replaced) - set(where)
    if missing:
        raise CheckpointError(f"{reader.dir}: the student has tensors the checkpoint lacks: {sorted(missing)[:3]}")
    plan = []
    for name, file in where.items():
        if name in dropped:
            continue
        if name in replaced:
            t = replaced[name].to(dtype).contiguous()
            plan.append((name, _ST_DTYPES[dtype], tuple(t.shape), t))
        else:
            e, h = headers[file].tensors[name], headers[file]
            plan.append((name, e.dtype, e.shape, (file, h.data_offset + e.start, e.nbytes)))
    return plan


def _nbytes(source) -> int:
    return source.numel() * source.element_size() if isinstance(source, torch.Tensor) else source[2]


def _write_shard(path: Path, items: list[tuple]) -> None:
    """A safetensors file written tensor by tensor: the header first (offsets tiling the data),
    then each tensor's bytes, copied from its source file in blocks or taken from the tensor."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, source in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + _nbytes(source)]}
        offset += _nbytes(source)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, _, source in items:
            if isinstance(source, torch.Tensor):
                out.write(source.view(torch.uint8).numpy().tobytes() if source.numel() else b"")
                continue
            file, start, n = source
            fd = os.open(file, os.O_RDONLY)
            try:
                out.writelines(os.pread(fd, min(64 << 20, n - pos), start + pos) for pos in range(0, n, 64 << 20))
            finally:
                os.close(fd)
        out.flush()
        os.fsync(out.fileno())


def write_weights(reader: CheckpointReader, replaced: dict[str, torch.Tensor], out: Path, dtype: torch.dtype,
                  shard_bytes: int = 4 << 30) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index past shard_bytes."""
    plan = _plan_tensors(reader, replaced, dtype)
    shards, size = [[]], 0
    for item in plan:
        if shards[-1] and size + _nbytes(item[3]) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += _nbytes(item[3])
    if len(shards) == 1:
        _write_shard(out / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    for name, items in zip(names, shards):
        _write_shard(out / name, items)
    index = {"metadata": {"total_size": sum(_nbytes(i[3]) for i in plan)},
             "weight_map": {item[0]: name for name, items in zip(names, shards) for item in items}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return names + ["model.safetensors.index.json"]


def transformers_equivalence(cfg) -> dict:
    """Whether runtimes that ignore `kept_experts` (transformers' DeepseekV3, vLLM) compute the
    student from this checkpoint. noaux_tc: the removed experts' bias keeps them unselected, but
    a routing group left with one kept expert scores it plus a removed one (about -1e4) there,
    ranking last, where dsexport scores the kept expert alone. Softmax routing (V2) has no bias."""
    pruned = {i: cfg.expert_ids(i) for i in cfg.moe_layers if len(cfg.expert_ids(i)) < cfg.n_routed_experts}
    if not pruned:
        return {"exact": True, "groups_of_one": {}}
    if not cfg.uses_correction_bias:
        return {"exact": False, "reason": "softmax routing has no correction bias to mask removed experts with"}
    ones = {}
    if cfg.grouped_routing:
        for i, ids in pruned.items():
            counts = {g: sum(1 for e in ids if e // cfg.group_size == g) for g in range(cfg.n_group)}
            if any(c == 1 for c in counts.values()):
                ones[str(i)] = [g for g, c in counts.items() if c == 1]
    return {"exact": not ones, "groups_of_one": ones}


def write_student(reader: CheckpointReader, model: DeepseekReference, out: Path, report: dict,
                  save_dtype: str = "float32", shard_bytes: int = 4 << 30) -> list[str]:
    """The student checkpoint into `out` (an empty staging directory); returns the files written."""
    cfg = model.cfg
    raw = load_json(reader.dir / "config.json", CheckpointError, max_bytes=4 << 20)
    if cfg.kept_experts is not None:
        raw["kept_experts"] = [list(ids) for ids in cfg.kept_experts]
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    pruned = cfg.kept_experts is not None and any(len(cfg.expert_ids(i)) < cfg.n_routed_experts for i in cfg.moe_layers)
    replaced = student_tensors(reader, model, removed_bias=pruned and cfg.uses_correction_bias)
    files = ["config.json"] + write_weights(reader, replaced, out, SAVE_DTYPES[save_dtype], shard_bytes)
    files += [n for n in TOKENIZER_FILES if copy_regular_file(reader.dir / n, out / n, reader.dir, CheckpointError)]
    report = {"format": REPORT_FORMAT, **report, "replaced_tensors": len(replaced), "save_dtype": save_dtype,
              "files": files, "transformers_equivalent": transformers_equivalence(cfg)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return files + [REPORT_FILE]


def is_distill_output(directory: Path) -> bool:
    """Whether a directory is a previous `dsexport distill` output (its report says so)."""
    return is_marked_output(directory, REPORT_FILE, REPORT_FORMAT)
