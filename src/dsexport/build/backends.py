"""Export backends: what writes a bundle's graphs for a kind of target, chosen from a registry
by the build plan (plan.backend).

    onnxruntime         one decoder graph, fused MoE / QMoE ops; the MTP graph when the plan has one
    onnxruntime-paged   segment graphs and the routed-expert store the runtime pages (docs/paging.md)
    tensorrt            standard ops and Q/DQ weights, checked against the target's TensorRT parsers,
                        with the engine plan `dsexport engine` builds from (docs/tensorrt.md)
    onnxruntime-mobile  the decoder converted to ORT format with its reduced-op config (docs/mobile.md)

Each takes (reader, staging directory, plan, progress) and returns what it wrote: the decoder's
manifest entry, the weight bytes, and its own manifest sections. The exporter modules (torch,
onnx) are imported when a backend runs, so the plan stays importable without them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dsexport.core.contract import decoder_contract, mtp_contract
from dsexport.core.errors import InternalError
from dsexport.core.manifest import DecoderGraph, MTPGraphInfo
from dsexport.core.sections import NativeSection, PagingSection, TensorRTSection

from .plan import GRAPH_FILE, BuildPlan

Progress = Callable[[str, int, int], None]
DATA_FILE = "model.onnx.data"


@dataclasses.dataclass
class Exported:
    decoder: DecoderGraph
    weight_bytes: int
    paging: PagingSection | None = None
    tensorrt: TensorRTSection | None = None
    mobile: dict | None = None
    mtp: MTPGraphInfo | None = None
    native: NativeSection | None = None


def export_config(plan: BuildPlan):
    from dsexport.exporter.export import ExportConfig

    return ExportConfig(moe_lowering=plan.moe_lowering, moe_shards=plan.moe_shards,
                        prefill_moe_lowering=plan.prefill_moe_lowering, quant=plan.quant, hidden_states=plan.mtp,
                        opset=plan.opset)


def _fused(reader, staging: Path, plan: BuildPlan, progress: Progress) -> Exported:
    from dsexport.exporter.export import export_model

    result = export_model(reader, staging, export_config(plan), progress)
    decoder = DecoderGraph(plan.moe_lowering, decoder_contract(plan.config, hidden_states=plan.mtp), GRAPH_FILE,
                           DATA_FILE, prompt_moe_lowering=plan.prefill_moe_lowering)
    return Exported(decoder, result.weight_bytes, native=result.native)


def export_onnxruntime(reader, staging: Path, plan: BuildPlan, progress: Progress) -> Exported:
    """The fused graph, with the native section CPUs run it from (docs/native.md)."""
    exported = _fused(reader, staging, plan, progress)
    if plan.target.execution_providers[:1] != ("CPUExecutionProvider",):
        exported.native = None  # an accelerator's graph: the native decoder is for CPU targets
    if plan.mtp:  # after the decoder: the MTP graph points into its data file
        from dsexport.exporter.mtp_export import MTP_DATA_FILE, MTP_GRAPH_FILE, export_mtp

        mtp = export_mtp(reader, staging, export_config(plan), progress)
        exported.mtp = MTPGraphInfo(MTP_GRAPH_FILE, MTP_DATA_FILE, mtp.weight_bytes, DATA_FILE, mtp.shared_weights,
                                    mtp.shared_bytes, mtp_contract(plan.config), plan.config.num_hidden_layers)
        if exported.native is not None and mtp.native is not None:  # drafting runs natively too
            exported.native = dataclasses.replace(exported.native, mtp=mtp.native)
    return exported


def export_paged_bundle(reader, staging: Path, plan: BuildPlan, progress: Progress) -> Exported:
    from dsexport.exporter.paged import PAGED_LOWERING, export_paged

    result = export_paged(reader, staging, export_config(plan), progress)
    decoder = DecoderGraph(PAGED_LOWERING, decoder_contract(plan.config), paged=True, segments=result.segments)
    paging = dataclasses.replace(result.paging, default_cache_mb=plan.default_cache_mb)
    return Exported(decoder, result.weight_bytes, paging=paging, native=result.native)


def export_tensorrt(reader, staging: Path, plan: BuildPlan, progress: Progress) -> Exported:
    """The standard-op graph, checked against every TensorRT version the target ships (the build
    fails on the one it targets), with the engine plan."""
    import onnx

    from dsexport.targets.tensorrt_check import check_model, check_profiles

    exported = _fused(reader, staging, plan, progress)
    exported.native = None  # TensorRT runs the graph
    versions = list(dict.fromkeys([*(plan.target.device.tensorrt if plan.target.device else ()), plan.tensorrt]))
    model = onnx.load(str(staging / GRAPH_FILE), load_external_data=False)
    checks: dict[str, dict] = {}
    progress("tensorrt check", 0, 1)
    for version in versions:
        report = check_model(model, version, "tensorrt", GRAPH_FILE)
        checks[version] = {"decoder": {"ok": report.ok, "errors": report.to_json()["errors"], "nodes": report.nodes}}
        if version == plan.tensorrt and not report.ok:
            raise InternalError("exported graph fails the TensorRT check:\n" + "\n".join(report.lines()))
    problems = check_profiles(model, plan.engine_plan.graphs["decoder"].profiles, GRAPH_FILE)
    if problems:
        raise InternalError("engine plan does not cover the graph: " + "; ".join(problems))
    progress("tensorrt check", 1, 1)
    if plan.prefill_moe_lowering:  # prompts run in chunks the engine's prompt profile holds
        exported.decoder = dataclasses.replace(exported.decoder, max_prompt_tokens=plan.engine_plan.prefill_tokens)
    exported.tensorrt = TensorRTSection("tensorrt", plan.tensorrt, checks, plan.engine_plan)
    return exported


def export_mobile(reader, staging: Path, plan: BuildPlan, progress: Progress) -> Exported:
    from dsexport.exporter.ort_mobile import convert_to_ort
    from dsexport.targets.mobile import EP_SETTINGS, ORT_OPTIMIZATION_STYLE

    exported = _fused(reader, staging, plan, progress)
    exported.native = None  # phones run the .ort file (its weights inside)
    progress("ort format", 0, 1)
    entry = convert_to_ort(staging, GRAPH_FILE, DATA_FILE, ORT_OPTIMIZATION_STYLE[plan.target.name])
    ort_file = entry.pop("file")
    exported.decoder = dataclasses.replace(exported.decoder, file=ort_file, data=None, ort_format=entry)
    exported.mobile = {"execution_providers": EP_SETTINGS[plan.target.name]}
    progress("ort format", 1, 1)
    return exported


EXPORTERS: dict[str, Callable[..., Exported]] = {
    "onnxruntime": export_onnxruntime,
    "onnxruntime-paged": export_paged_bundle,
    "tensorrt": export_tensorrt,
    "onnxruntime-mobile": export_mobile,
}
