"""The build plan: everything a build will do, resolved once, before any work, without torch.

    plan = resolve_plan(BuildConfig(model_dir, target="jetson-orin-nano-8gb", precision="int4"), profile)

From the request (the flags), the target, the checkpoint's config (and its tensor names) and the
calibration profile, `resolve_plan` decides: precision and quantization spec, kept experts and
what removing the others saves at that spec, the MoE lowerings, the opset, the context, the
TensorRT version and engine plan, the memory plan and whether it fits, paging and its default
cache, whether an MTP graph is exported, and which export backend writes the bundle. Every later
stage reads the plan; nothing re-derives it. `dsexport plan` prints this same plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dsexport.calibration.profile import Profile
from dsexport.calibration.pruning import PruneConfig, check_profile_matches, plan_expert_bits, plan_pruning
from dsexport.core.config import ModelConfig, load_config
from dsexport.core.errors import CheckpointError, InternalError, UserError
from dsexport.core.files import sha256_file
from dsexport.core.quant import QuantSpec
from dsexport.core.safetensors import checkpoint_tensors
from dsexport.core.sections import EnginePlan, PruningRecord
from dsexport.targets import get_target
from dsexport.targets.memory_plan import MemoryPlan, paging_plan, plan_memory, suggestions
from dsexport.targets.quantization import quant_spec_for
from dsexport.targets.registry import MOE_LOWERINGS, Target, check_lowering

OPSET = 17
QDQ_INT4_OPSET = 21  # INT4 tensors and block-wise DequantizeLinear (TensorRT int4 weights)
GRAPH_FILE = "model.onnx"


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """What the user asked for (the CLI's flags, or the Python API)."""
    model_dir: Path
    out_dir: Path | None = None
    target: str = "x86-cpu"
    precision: str | None = None  # None: the target's default
    overwrite: bool = False
    kept_experts: dict[int, list[int]] | None = None  # explicit experts to keep (else from `prune` and a profile)
    pruning: dict | PruningRecord | None = None  # how explicit kept_experts were chosen, for the manifest
    prune: PruneConfig | None = None  # remove experts by a calibration profile
    moe_lowering: str | None = None  # None: the target's choice
    moe_shards: int | None = None  # None: the target's choice
    max_context: int | None = None  # context the bundle is planned for (None: the target's default)
    tensorrt: str | None = None  # TensorRT version the graphs are checked against (None: the target's)
    force: bool = False  # build even when the memory plan says the target cannot hold it
    block_size: int = 32  # quantization block (int8/int4)
    quantize: dict[str, int | None] | None = None  # per-part bits overriding the precision's preset
    expert_bits: dict[int, dict[int, int]] | tuple[int, float] | None = None  # explicit widths, or (bits, fraction)
    zero_points: bool = False
    activations: str = "int8"  # int8: quantized kernels round their inputs (fast); fp32: exact
    expert_block_size: int | None = None
    paged: bool | None = None  # None: paged when the target cannot hold every expert and can page
    expert_cache_mb: float | None = None
    mtp: bool | None = None  # None: included when the checkpoint has MTP weights and the backend takes it
    allow_no_tokenizer: bool = False  # build a token-ids-only bundle from a checkpoint without tokenizer.json
    quant_method: str = "rtn"  # "awq": MoE layers rescaled on the calibration text first (calibration/awq.py)


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    request: BuildConfig
    target: Target
    precision: str
    source_config: ModelConfig  # the checkpoint's, unpruned
    config: ModelConfig  # what the bundle holds (kept experts)
    config_sha256: str
    quant: QuantSpec | None
    moe_lowering: str
    prefill_moe_lowering: str | None
    moe_shards: int
    opset: int
    context: int
    tensorrt: str | None
    engine_plan: EnginePlan | None
    memory: MemoryPlan
    paging: dict  # targets/memory_plan.paging_plan, with "chosen"
    paged: bool
    default_cache_mb: float | None
    mtp: bool
    pruning: PruningRecord | None
    backend: str  # the export backend that writes the bundle (dsexport/build/backends.py)

    @property
    def fits(self) -> bool | None:
        return self.memory.fits

    def suggestions(self) -> list[str]:
        return suggestions(self.config, self.target, self.memory, self.quant)

    def memory_json(self) -> dict:
        return {**self.memory.to_json(), "paging": self.paging}

    def to_json(self) -> dict:
        """`dsexport plan --json`: the memory plan's fields (a stable contract), then the build's."""
        return {**self.memory.to_json(), "suggestions": self.suggestions(), "paging": self.paging,
                "pruning": self.pruning.to_json() if self.pruning else None,
                "build": {"backend": self.backend, "target": self.target.name, "precision": self.precision,
                          "quantization": self.quant.to_json() if self.quant else None,
                          "moe_lowering": self.moe_lowering, "prefill_moe_lowering": self.prefill_moe_lowering,
                          "moe_shards": self.moe_shards, "opset": self.opset, "context": self.context,
                          "paged": self.paged, "default_cache_mb": self.default_cache_mb, "mtp": self.mtp,
                          "tensorrt": self.tensorrt,
                          "engine_plan": self.engine_plan.to_json() if self.engine_plan else None}}


# ---- resolution ---------------------------------------------------------------------------
def resolve_plan(request: BuildConfig, profile: Profile | None = None, for_build: bool = True) -> BuildPlan:
    """The plan of a build; raises UserError (one line) for anything the build would refuse.
    for_build=False (`dsexport plan`): a target whose export is not written yet, a model that
    does not fit, are reported rather than refused."""
    target = get_target(request.target)
    if for_build and not target.buildable:
        raise UserError(f"target {target.name} needs the {target.backend} export, which this dsexport cannot build "
                        f"yet; `dsexport plan --target {target.name}` shows its memory plan")
    precision = request.precision or target.default_precision
    if precision not in target.precisions:
        raise UserError(f"precision {precision!r} is not available for {target.name}; "
                        f"choose from {', '.join(target.precisions)}")
    source = load_config(request.model_dir)
    config_sha = sha256_file(Path(request.model_dir) / "config.json")
    if profile is not None:
        check_profile_matches(profile, source, config_sha)
    quant = _quant(request, target, precision, source, profile)
    config, pruning = _pruning(request, source, profile, quant)
    moe_lowering, prefill_lowering = _lowerings(request, target)
    opset = QDQ_INT4_OPSET if quant is not None and quant.lowering == "qdq" and 4 in quant.bits.values() else OPSET
    context = min(request.max_context or target.context_default, config.max_position_embeddings)
    if context < 2:
        raise UserError(f"max_context must be at least 2, got {context}")
    tensorrt, engine = _tensorrt(request, target, config, precision, context, quant)
    memory = plan_memory(config, target, precision, context, quant=quant)
    paging, paged, cache_mb = _paging(request, target, config, memory, quant, for_build)
    backend = _backend(target, paged)
    mtp = _mtp(request, target, source, paged)
    _check_tokenizer(request, for_build)
    return BuildPlan(request, target, precision, source, config, config_sha, quant, moe_lowering, prefill_lowering,
                     request.moe_shards or target.moe_shards, opset, context, tensorrt, engine, memory, paging, paged,
                     cache_mb, mtp, pruning, backend)


def _quant(request: BuildConfig, target: Target, precision: str, cfg: ModelConfig,
           profile: Profile | None) -> QuantSpec | None:
    widths = request.expert_bits
    if isinstance(widths, tuple):  # (bits, fraction) of the experts that matter most, by the profile
        if profile is None:
            raise UserError("--expert-bits needs --calib: a calibration profile (`dsexport calibrate`)")
        kept = _kept_by_profile(request, cfg, profile, None)
        criterion = request.prune.criterion if request.prune else "output-mass"
        widths = plan_expert_bits(cfg, profile, widths[0], widths[1], criterion, kept)
    quant = quant_spec_for(target, precision, request.block_size, request.quantize, request.activations,
                           request.zero_points, request.expert_block_size, widths or None)
    if quant is None:
        if request.quant_method != "rtn":
            raise UserError(f"--quant-method {request.quant_method} needs quantized weights (--precision int4|int8)")
        return None
    if request.quant_method == "awq" and profile is None:
        raise UserError("--quant-method awq needs --calib: calibration text (or a profile of it) to search the scales on")
    quant = dataclasses.replace(quant, method=request.quant_method)
    if target.backend != "tensorrt" and "routed_experts" in quant.bits:
        lowering = request.moe_lowering or target.moe_lowering
        if lowering != "ort-moe":
            raise UserError(f"quantized routed experts need the ort-moe lowering (QMoE), not {lowering}")
    return quant.for_model(cfg.hidden_size, cfg.moe_intermediate_size)


def _kept_by_profile(request: BuildConfig, cfg: ModelConfig, profile: Profile | None,
                     quant: QuantSpec | None) -> dict[int, list[int]] | None:
    if request.prune is None:
        return request.kept_experts
    if profile is None:
        raise UserError("--prune needs --calib: a calibration profile (`dsexport calibrate`) or a data file")
    return plan_pruning(cfg, profile, request.prune, quant).kept


def _pruning(request: BuildConfig, cfg: ModelConfig, profile: Profile | None,
             quant: QuantSpec | None) -> tuple[ModelConfig, PruningRecord | None]:
    """The config with the kept experts, and the record of what was removed, priced at `quant`."""
    if request.prune is not None:
        if request.kept_experts is not None:
            raise UserError("pass either --prune (with a profile) or explicit kept experts, not both")
        if profile is None:
            raise UserError("--prune needs --calib: a calibration profile (`dsexport calibrate`) or a data file")
        plan = plan_pruning(cfg, profile, request.prune, quant)
        return cfg.with_kept_experts(plan.kept), plan.to_record(profile)
    if request.kept_experts is None:
        return cfg, None
    pruned = cfg.with_kept_experts(request.kept_experts)
    record = request.pruning
    if isinstance(record, dict):
        from dsexport.core.jsonio import Fields

        record = PruningRecord.read(Fields(record, "pruning", UserError))
    return pruned, record


def _lowerings(request: BuildConfig, target: Target) -> tuple[str, str | None]:
    lowering = check_lowering(request.moe_lowering or target.moe_lowering)
    prefill = None if MOE_LOWERINGS[lowering] else (target.prefill_moe_lowering or "dense")
    if target.onnx_opset != OPSET:
        raise InternalError(f"target {target.name} takes opset {target.onnx_opset}; the exporter writes {OPSET}")
    return lowering, prefill


def _tensorrt(request: BuildConfig, target: Target, cfg: ModelConfig, precision: str, context: int,
              quant: QuantSpec | None) -> tuple[str | None, EnginePlan | None]:
    if target.backend != "tensorrt":
        if request.tensorrt:
            raise UserError(f"--tensorrt applies to TensorRT targets, not {target.name}")
        return None, None
    from dsexport.targets.tensorrt_plan import engine_plan
    from dsexport.targets.tensorrt_versions import parser_version

    version = request.tensorrt or target.tensorrt_default
    if quant is not None and 4 in quant.bits.values() and int(parser_version(version).name.split(".")[0]) < 10:
        raise UserError(f"int4 weights need TensorRT 10 or later (INT4 Q/DQ); TensorRT {version} takes int8: "
                        f"use --precision int8, or --tensorrt 10.3 (JetPack 6)")
    # on the kept experts' config: the engine holds what the bundle holds
    return version, engine_plan(cfg, target, precision, version, context, GRAPH_FILE)


def _paging(request: BuildConfig, target: Target, cfg: ModelConfig, memory: MemoryPlan, quant: QuantSpec | None,
            for_build: bool) -> tuple[dict, bool, float | None]:
    """The paging plan with the choice made: explicit --paged, or paged by default when the
    target cannot hold every expert and its backend can page."""
    paging = paging_plan(cfg, target, memory, quant)
    if request.paged and not paging.get("can_page", False):
        raise UserError(f"--paged is not available for {target.name}: {paging.get('reason', 'its backend cannot page')}")
    auto = request.paged is not False and bool(paging.get("fits"))
    if memory.fits is False and not request.force and not auto and for_build:
        advice = "; ".join(suggestions(cfg, target, memory, quant))
        raise UserError(f"the model does not fit {target.name}: it needs {memory.total_bytes / 1e9:.2f} GB of "
                        f"{memory.usable_bytes / 1e9:.2f} GB usable at {memory.precision}, {memory.context} tokens of "
                        f"context (`dsexport plan` itemizes it); would fit with: {advice}; --force builds anyway")
    paged = bool(request.paged) or (memory.fits is False and auto)
    paging = {**paging, "chosen": paged}
    mb = request.expert_cache_mb
    if not paged:
        if mb is not None:
            raise UserError("--expert-cache-mb sets a paged bundle's default cache; add --paged")
        return paging, False, None
    if mb is not None:
        if not mb > 0:
            raise UserError(f"--expert-cache-mb must be positive, got {mb}")
        return paging, True, float(mb)
    cache = paging.get("cache_bytes")
    return paging, True, (round(cache / 2**20, 3) if cache is not None else None)


def _check_tokenizer(request: BuildConfig, for_build: bool) -> None:
    """A checkpoint without tokenizer.json would build a bundle the CLI cannot prompt: refused
    unless asked for (token-ids-only bundles for apps that tokenize themselves)."""
    path = Path(request.model_dir) / "tokenizer.json"
    if for_build and not request.allow_no_tokenizer and not (path.is_file() or path.is_symlink()):
        raise CheckpointError(f"{request.model_dir} has no tokenizer.json, so the bundle could not encode prompts; "
                              "add the checkpoint's tokenizer files, or pass --allow-no-tokenizer for a bundle that "
                              "takes token ids only")


def _backend(target: Target, paged: bool) -> str:
    if target.backend == "onnxruntime":
        return "onnxruntime-paged" if paged else "onnxruntime"
    return target.backend


def has_mtp_weights(model_dir: Path, cfg: ModelConfig) -> bool:
    """Whether the checkpoint holds an MTP module (DeepSeek's layer num_hidden_layers); a directory
    with a config.json only (`dsexport plan`) answers from the config."""
    try:
        names = checkpoint_tensors(model_dir)
    except CheckpointError:
        names = {}
    if not names:
        return cfg.num_nextn_predict_layers > 0
    return f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in names


def _mtp(request: BuildConfig, target: Target, cfg: ModelConfig, paged: bool) -> bool:
    if request.mtp is False:
        return False
    if not has_mtp_weights(request.model_dir, cfg):
        if request.mtp:
            raise UserError(f"{request.model_dir} has no MTP weights (model.layers.{cfg.num_hidden_layers}.eh_proj.weight);"
                            " build without --mtp")
        return False
    if target.backend != "onnxruntime" or paged:
        if request.mtp:
            raise UserError(f"the MTP graph is built for single-graph ONNX Runtime bundles, not for "
                            f"{'paged bundles' if paged else f'{target.name} ({target.backend})'}")
        return False
    return True
