"""Build a bundle: the staged pipeline from checkpoint directory to verified bundle directory.

    load -> export -> tokenizer -> verify (ONNX Runtime runs it; golden outputs from the reference)
         -> manifest with checksums -> publish

Each stage reports progress; the directory is the hand-off. Everything is written into a
hidden `.NAME.partial-*` directory beside the destination and renamed into place only when
complete, so an interrupted build never leaves something that looks like a bundle (and an
existing bundle is replaced only by a finished one).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from dsexport.errors import InternalError, UserError
from dsexport.runtime.bundle import BUNDLE_FORMAT, MANIFEST_FILE, SCHEMA_VERSION, sha256_file
from dsexport.runtime.validate import GOLDEN_FILE

from .checkpoint import CheckpointReader
from .config import ModelConfig, parameter_counts
from .export import DATA_FILE, GRAPH_FILE, ExportConfig, export_model, graph_contract
from .golden import golden_generations, logit_tolerance, make_golden
from .graph import OPSET
from .lowering import get_lowering

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    model_dir: Path
    out_dir: Path
    target: str = "x86-cpu"
    precision: str | None = None  # None: the target's default
    overwrite: bool = False
    kept_experts: dict[int, list[int]] | None = None
    pruning: dict | None = None  # how kept_experts was chosen (calibration.pruning.PruningPlan.to_json), for the manifest
    moe_lowering: str | None = None  # None: the target's choice; else a MOE_LOWERINGS key
    moe_shards: int | None = None  # None: the target's choice
    max_context: int | None = None  # context the bundle is planned for (None: the target's default)
    tensorrt: str | None = None  # TensorRT version the graphs are checked against (None: the target's)
    force: bool = False  # build even when the memory plan says the target cannot hold it
    block_size: int = 32  # quantization block (int8/int4)
    quantize: dict[str, int | None] | None = None  # per-part bits overriding the precision's preset (exporter/quantize.py)
    expert_bits: dict[int, dict[int, int]] | None = None  # per-expert widths over routed_experts' (calibration)
    zero_points: bool = False  # asymmetric quantization (a zero point per block; ONNX Runtime targets)
    activations: str = "int8"  # int8: quantized kernels quantize their inputs (fast); fp32: exact (QuantConfig)
    expert_block_size: int | None = None  # routed experts' block when it differs from block_size
    # Routed experts in a store outside the graphs, paged by the runtime (exporter/paged.py). None:
    # paged when the target's memory cannot hold every expert and its backend can page.
    paged: bool | None = None
    expert_cache_mb: float | None = None  # the paged bundle's default expert cache (None: from the memory plan)
    # The MTP graph for drafting (docs/mtp.md). None: included when the checkpoint has MTP weights
    # and the bundle is one decoder graph for ONNX Runtime (not TensorRT, phones or paged).
    mtp: bool | None = None


@dataclasses.dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest: dict


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import tokenizers
    import torch

    from dsexport import __version__

    return {"dsexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "tokenizers": tokenizers.__version__}


def model_stats(cfg: ModelConfig, weight_bytes: int, bytes_per_weight: float = 4.0) -> dict:
    total, active = parameter_counts(cfg)
    return {"parameters": total, "active_parameters_per_token": active, "weight_bytes": weight_bytes,
            "decode_weight_bytes_per_token": int(active * bytes_per_weight),
            "cache_bytes_per_token": cfg.latent_dim * 4 * cfg.num_hidden_layers}


def _verify_graph(directory: Path, cfg: ModelConfig):
    """Load the graph in ONNX Runtime and run one token: a graph the runtime cannot run fails the build."""
    import numpy as np

    from dsexport.runtime import Engine

    engine = Engine.load(directory, verify=False)
    logits, cache = engine.forward(np.array([[0]]), np.array([[0]]), np.ones((1, 1), np.int64), engine.empty_cache(1))
    if logits.shape != (1, 1, cfg.vocab_size) or not np.isfinite(logits).all():
        raise InternalError(f"exported graph produced logits of shape {logits.shape} / non-finite values")
    return engine


def _memory_gate(reader: CheckpointReader, build: BuildConfig, target, precision: str, context: int,
                 quant=None) -> dict:
    """The memory plan of the targets docs: a build that cannot fit stops, unless forced or paged
    (its `paging` entry: whether the backend can page and the expert cache that leaves)."""
    from dsexport.targets.memory_plan import paging_plan, plan_memory, suggestions

    cfg = reader.config.with_kept_experts(build.kept_experts)
    plan = plan_memory(cfg, target, precision, context)
    # the store holds routed experts at their width (exporter/paged.py): the plan sizes it so
    paging = paging_plan(cfg, target, plan, quant.bits.get("routed_experts") if quant is not None else "preset")
    auto_paged = build.paged is not False and bool(paging.get("fits"))
    if plan.fits is False and not build.force and not auto_paged:
        advice = "; ".join(suggestions(cfg, target, plan))
        raise UserError(f"the model does not fit {target.name}: it needs {plan.total_bytes / 1e9:.2f} GB of "
                        f"{plan.usable_bytes / 1e9:.2f} GB usable at {precision}, {context} tokens of context "
                        f"(`dsexport plan` itemizes it); would fit with: {advice}; --force builds anyway")
    return {**plan.to_json(), "paging": {**paging, "chosen": bool(build.paged) or (plan.fits is False and auto_paged)}}


def _tensorrt_stage(staging: Path, cfg: ModelConfig, target, precision: str, tensorrt: str, context: int,
                    progress: Progress) -> dict:
    """Static TensorRT check of the graph against every TensorRT version the target ships
    (the build fails on the chosen one), and the engine-build plan for `dsexport engine`."""
    import onnx

    from dsexport.targets.tensorrt_check import check_model, check_profiles
    from dsexport.targets.tensorrt_plan import engine_plan

    graph_files = {"decoder": GRAPH_FILE}
    plan = engine_plan(cfg, target, precision, tensorrt, context, GRAPH_FILE)
    versions = list(dict.fromkeys([*(target.device.tensorrt if target.device else ()), plan["tensorrt"]]))
    checks: dict[str, dict] = {}
    progress("tensorrt check", 0, len(graph_files))
    for n, (role, name) in enumerate(graph_files.items()):
        model = onnx.load(str(staging / name), load_external_data=False)
        for version in versions:
            report = check_model(model, version, "tensorrt", name)
            checks.setdefault(version, {})[role] = report.to_json()
            if version == plan["tensorrt"] and not report.ok:
                raise InternalError("exported graph fails the TensorRT check:\n" + "\n".join(report.lines()))
        problems = check_profiles(model, plan["graphs"][role]["profiles"], name)
        if problems:
            raise InternalError("engine plan does not cover the graph: " + "; ".join(problems))
        progress("tensorrt check", n + 1, len(graph_files))
    return {"route": "tensorrt", "checked_against": plan["tensorrt"],
            "checks": {v: {role: {"ok": r["ok"], "errors": r["errors"], "nodes": r["nodes"]} for role, r in c.items()}
                       for v, c in checks.items()},
            "engine_plan": plan}


def _include_mtp(reader: CheckpointReader, build: BuildConfig, target, paged: bool) -> bool:
    from .mtp_export import has_mtp_weights

    if build.mtp is False:
        return False
    if not has_mtp_weights(reader):
        if build.mtp:
            raise UserError(f"{build.model_dir} has no MTP weights (model.layers.{reader.config.num_hidden_layers}"
                            ".eh_proj.weight); build without --mtp")
        return False
    if target.backend != "onnxruntime" or paged:
        if build.mtp:
            raise UserError(f"the MTP graph is built for single-graph ONNX Runtime bundles, not for "
                            f"{'paged bundles' if paged else f'{target.name} ({target.backend})'}")
        return False
    return True


def _tensorrt_quantization(build: BuildConfig, precision: str, tensorrt: str):
    """int8 / int4 weights for TensorRT: DequantizeLinear on constants (exporter/qdq.py), the
    symmetric scheme (TensorRT takes positive scales and no zero points), INT8 per output channel,
    INT4 block-wise (TensorRT 10+, opset 21). Activations stay floating point (weight-only)."""
    from dsexport.targets.tensorrt_check import parser_version

    from .graph import QDQ_INT4_OPSET
    from .quantize import PRESETS, QuantConfig

    if build.zero_points:
        raise UserError("TensorRT takes symmetric weights only (zero points must be zero); drop --zero-points")
    if build.expert_bits:
        raise UserError("--expert-bits (one QMoE per width) is for ONNX Runtime targets; TensorRT graphs take one "
                        "width for the routed experts")
    quant = QuantConfig.preset(precision if precision in PRESETS else "fp32", build.block_size, build.quantize,
                               activations="fp32")
    quant = dataclasses.replace(quant, scheme="symmetric", per_channel_bits=(8,), lowering="qdq",
                                expert_block_size=build.expert_block_size)
    if 4 in quant.bits.values():
        if int(parser_version(tensorrt).name.split(".")[0]) < 10:
            raise UserError(f"int4 weights need TensorRT 10 or later (INT4 Q/DQ); TensorRT {tensorrt} takes int8: "
                            f"use --precision int8, or --tensorrt 10.3 (JetPack 6)")
        return quant, QDQ_INT4_OPSET
    return quant, OPSET


def build_bundle(build: BuildConfig, progress: Progress = lambda stage, done, total: None) -> BuildResult:
    from dsexport.targets import get_target

    target = get_target(build.target)
    if not target.buildable:
        raise UserError(f"target {target.name} needs the {target.backend} export, which this dsexport cannot build "
                        f"yet; `dsexport plan --target {target.name}` shows its memory plan")
    precision = build.precision or target.default_precision
    if precision not in target.precisions:
        raise UserError(f"precision {precision!r} is not available for {target.name}; "
                        f"choose from {', '.join(target.precisions)}")
    lowering = get_lowering(build.moe_lowering or target.moe_lowering)  # an unknown name fails before any work

    if target.onnx_opset != OPSET:
        raise InternalError(f"target {target.name} takes opset {target.onnx_opset}; the exporter writes {OPSET}")
    prefill_lowering = None if lowering.prefill_ok else (target.prefill_moe_lowering or "dense")
    from .quantize import PRESETS, QuantConfig

    quant, opset = QuantConfig(), OPSET
    tensorrt = build.tensorrt or target.tensorrt_default if target.backend == "tensorrt" else None
    if target.backend != "tensorrt":
        if precision not in PRESETS:
            raise UserError(f"precision {precision} is not available for {target.backend}; choose from "
                            f"{', '.join(PRESETS)}")
        quant = QuantConfig.preset(precision, build.block_size, build.quantize, activations=build.activations)
        quant = dataclasses.replace(quant, scheme="asymmetric" if build.zero_points else "absmax",
                                    expert_block_size=build.expert_block_size)
        if build.expert_bits:
            if "routed_experts" not in quant.bits:
                raise UserError("--expert-bits needs quantized routed experts (--precision int4|int8)")
            quant = dataclasses.replace(quant, expert_bits=build.expert_bits)
        if quant.active and lowering.name != "ort-moe" and "routed_experts" in quant.bits:
            raise UserError(f"quantized routed experts need the ort-moe lowering (QMoE), not {lowering.name}")
    elif precision in PRESETS or build.quantize:
        quant, opset = _tensorrt_quantization(build, precision, tensorrt)
    out = Path(build.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not build.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")

    progress("loading", 0, 1)
    reader = CheckpointReader(build.model_dir)
    progress("loading", 1, 1)
    context = min(build.max_context or target.context_default, reader.config.max_position_embeddings)
    if context < 2:
        raise UserError(f"max_context must be at least 2, got {context}")
    memory_plan = _memory_gate(reader, build, target, precision, context, quant)
    from .paged import paging_choice

    paged, default_cache_mb = paging_choice(build, target, memory_plan)
    include_mtp = _include_mtp(reader, build, target, paged)
    quant = quant.for_model(reader.config.hidden_size, reader.config.moe_intermediate_size)
    if target.backend == "tensorrt":
        from dsexport.targets.tensorrt_plan import engine_plan

        # fails on a precision the TensorRT version cannot take, before any work
        engine_plan(reader.config, target, precision, tensorrt, context, GRAPH_FILE)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        export_cfg = ExportConfig(moe_lowering=lowering.name, moe_shards=build.moe_shards or target.moe_shards,
                                  prefill_moe_lowering=prefill_lowering, quant=quant, hidden_states=include_mtp,
                                  opset=opset)
        if paged:  # segment graphs + expert store (exporter/paged.py, docs/paging.md)
            from .paged import export_paged

            result = export_paged(reader, staging, export_cfg, progress, kept_experts=build.kept_experts)
            decoder = dict(result.graphs)
        else:
            result = export_model(reader, staging, export_cfg, progress, kept_experts=build.kept_experts)
            decoder = {"file": GRAPH_FILE, "data": DATA_FILE, "moe_lowering": lowering.name}
        cfg = result.config
        if prefill_lowering:  # an If in the graph picks it for prompts (docs/tensorrt.md)
            decoder.update(prompt_moe_lowering=prefill_lowering, max_prompt_tokens=None)
        tensorrt_section = None
        if tensorrt is not None:
            tensorrt_section = _tensorrt_stage(staging, cfg, target, precision, tensorrt, context, progress)
            if prefill_lowering:
                decoder["max_prompt_tokens"] = tensorrt_section["engine_plan"]["prefill_tokens"]
        mobile = None
        if target.backend == "onnxruntime-mobile":  # phones: ORT format + reduced-op config (docs/mobile.md)
            from dsexport.targets.mobile import EP_SETTINGS, ORT_OPTIMIZATION_STYLE

            from .ort_mobile import convert_to_ort

            progress("ort format", 0, 1)
            decoder = {**convert_to_ort(staging, GRAPH_FILE, DATA_FILE, ORT_OPTIMIZATION_STYLE[target.name]),
                       "moe_lowering": lowering.name}
            mobile = {"execution_providers": EP_SETTINGS[target.name]}
            progress("ort format", 1, 1)
        graphs = {"decoder": {**decoder, **graph_contract(cfg, hidden_states=include_mtp)}}
        if include_mtp:  # after the decoder: the MTP graph points into its data file
            from .mtp_export import MTP_DATA_FILE, MTP_GRAPH_FILE, export_mtp, mtp_graph_contract

            mtp = export_mtp(reader, staging, export_cfg, progress)
            graphs["mtp"] = {"file": MTP_GRAPH_FILE, "data": MTP_DATA_FILE, "weight_bytes": mtp.weight_bytes,
                             "shared_data": DATA_FILE, "shared_weights": list(mtp.shared_weights),
                             "shared_bytes": mtp.shared_bytes, **mtp_graph_contract(cfg)}

        tokenizer_files = []
        for name in TOKENIZER_FILES:
            if (reader.dir / name).is_file():
                shutil.copyfile(reader.dir / name, staging / name)
                tokenizer_files.append(name)

        manifest = {
            "format": BUNDLE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "producer": _versions(),
            "source": {"checkpoint": str(Path(build.model_dir).resolve().name),
                       "config_sha256": sha256_file(reader.dir / "config.json")},
            "model": cfg.to_json(),
            "target": {"name": target.name, "backend": target.backend,
                       "execution_providers": list(target.execution_providers)},
            "precision": precision,
            "export": {k: v for k, v in dataclasses.asdict(export_cfg).items() if k != "quant"},
            "context": context,
            "graphs": graphs,
            "memory_plan": memory_plan,
            "tokenizer": {"files": tokenizer_files},
            "golden": {"file": GOLDEN_FILE, "producer": "reference"},
            "stats": model_stats(cfg, result.weight_bytes, result.weight_bytes / parameter_counts(cfg)[0]),
        }
        if quant.active:
            manifest["quantization"] = quant.to_json()
        if tensorrt_section is not None:
            manifest["tensorrt"] = tensorrt_section
        if mobile is not None:
            manifest["mobile"] = mobile
        if build.pruning is not None:
            manifest["pruning"] = build.pruning
        if paged:
            manifest["paging"] = {**result.paging, "default_cache_mb": default_cache_mb}
            manifest["export"]["moe_lowering"] = decoder["moe_lowering"]
        # The verify stage loads the bundle through the runtime, so the manifest goes in first
        # (without checksums); the final manifest, with them, is written after verification.
        (staging / MANIFEST_FILE).write_text(json.dumps({**manifest, "files": {}}, indent=2))
        progress("verifying", 0, 2)
        engine = _verify_graph(staging, cfg)
        progress("verifying", 1, 2)
        # golden outputs from the reference, and the build's own parity check (exporter/golden.py)
        prompts, outputs = golden_generations(engine, cfg.vocab_size)
        if include_mtp:  # the MTP graph against the torch MTPModule, on the decoder graph's hidden states
            from .mtp_export import verify_mtp

            graphs["mtp"]["verify"] = verify_mtp(reader, engine, quant if quant.active else None,
                                                 logit_tolerance(quant if quant.active else None))
        del engine  # the session's memory goes before the reference model's arrives
        (staging / GOLDEN_FILE).write_text(json.dumps(make_golden(reader, prompts, outputs,
                                                                  quant if quant.active else None)))
        progress("verifying", 2, 2)
        files = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST_FILE)
        progress("checksums", 0, len(files))
        manifest["files"] = {}
        for i, name in enumerate(files):
            manifest["files"][name] = {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
            progress("checksums", i + 1, len(files))
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        if out.exists():
            # Only a finished bundle replaces an existing one; moved aside first, removed after.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(out, manifest)
