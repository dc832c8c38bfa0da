"""Package an exported decoder for ONNX Runtime Mobile: ORT format plus a reduced-operator config.

    model.onnx + model.onnx.data  ->  model.ort + required_operators.config

Phones run a minimal ONNX Runtime build, which loads only ORT-format models (a flatbuffer,
`.ort`) and contains only the operator kernels named in a configuration file given to its build
(`--include_ops_by_config`). Both come from onnxruntime's own tools, called as Python functions:

- `onnxruntime.tools.convert_onnx_models_to_ort.convert_onnx_models_to_ort` loads the ONNX model
  in an InferenceSession with the CPU execution provider, applies the graph optimizations
  (`ORT_ENABLE_ALL` for the "Fixed" style) and saves the optimized graph as `.ort`. With
  `target_platform="arm"` it leaves out the x86-only NCHWc layout transformer (its blocked
  kernels would make the model x86-specific) and allows int8 QDQ handling as ARM wants it.
  The optimizations applied are otherwise those of the host's CPU EP; for the fp32 graphs built
  today they are platform-neutral (SimplifiedLayerNormalization, FusedMatMul, QuickGelu fusions,
  constant folding). Note for later fp16 bundles: an x86 host lacks many fp16 CPU kernels that
  ARM64 builds have, so converting fp16 nodes here could bake fp32 casts into the model.
- It then calls `onnxruntime.tools.ort_format_model.create_config_from_models`, which reads the
  saved `.ort` flatbuffer (`OrtFormatModelProcessor`) and writes every (domain, opset, operator)
  the model uses, here with type reduction.

Type reduction: on. The tool supports it for ORT-format models only (the per-node types are read
from the `.ort` file; ONNX models do not carry them reliably), which is what we convert from. The
entries gain the element types each operator needs (e.g. `MatMul{"inputs": {"0": ["float"]}}`);
a build with `--enable_reduced_operator_type_support` then drops kernels for other types, and a
build without that flag ignores the types, so one file serves both. Operators without a type
processor in the tool (com.microsoft MoE among them) keep all their types. The set is exact for
the "Fixed" style, whose graph is final; for "Runtime" the tool unions the ops of the model with
and without its saved runtime optimizations.

External data: none in onnxruntime 1.32. The flatbuffer schema's `Tensor` has an
`external_data_offset` field and `fbs::utils::SaveInitializerOrtFormat` takes an
`ExternalDataWriter`, but only on-device-training checkpoints use them (onnxruntime PR #20077);
`Graph::SaveToOrtFormat`, which writes inference models, calls it without a writer, so every
initializer is embedded, and loading a model tensor without `raw_data` fails ("Missing raw data
for initializer. Invalid ORT format model."). A `.ort` model is therefore one flatbuffer, which
32-bit offsets cap at 2 GiB - 1 byte; converting something larger is not refused by the tool
(onnxruntime issue #15756 reports a >2 GB model "converted successfully" into an invalid file), so
`convert_to_ort` checks the weight bytes first and the written size after.

Memory: the conversion holds the whole model (weights loaded, optimized graph, the flatbuffer
being built; the config step then reads the .ort twice over). Measured here: 1.34 GB peak RSS
converting 400 MB of fp32 weights (~3.2x, the interpreter's own 0.06 GB included), so ~7 GB for
a model at the 2 GiB cap.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from dsexport.core.errors import BundleError, InternalError, UserError

ORT_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"
OPTIMIZATION_STYLES = ("Fixed", "Runtime")
TARGET_PLATFORM = "arm"
TYPE_REDUCTION = True
# flatbuffers' FLATBUFFERS_MAX_BUFFER_SIZE: offsets are signed 32-bit, so one buffer < 2 GiB.
ORT_FORMAT_MAX_BYTES = 2**31 - 1
# The session option a "Runtime"-style model needs for its saved optimizations to be replayed.
RUNTIME_OPT_ENTRY = "session.enable_saved_runtime_optimizations"
# Bytes per fp32 weight byte at int8 / int4 with one fp16 scale per 32 weights (1.0625 and 0.5625
# bytes per weight, the figures docs/targets.md plans with), for the "what would fit" hint.
_QUANT_RATIO = {"int8": 1.0625 / 4, "int4": 0.5625 / 4}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def inspect_onnx(model_path: Path) -> tuple[int, set[str], set[tuple[str, str]]]:
    """Read the ONNX graph without its external data: the bytes of every tensor it holds
    (initializers and Constant values), the external data files it names, and its (domain, op)s."""
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper

    model = onnx.load(str(model_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                tensors.extend(attr.tensors)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    total, locations = 0, set()
    for t in tensors:
        if external_data_helper.uses_external_data(t):
            info = external_data_helper.ExternalDataInfo(t)
            locations.add(info.location)
            if info.length is not None:
                total += int(info.length)
                continue
        if t.data_type == onnx.TensorProto.STRING:
            total += sum(len(s) for s in t.string_data)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            total += count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total, locations, ops


def _check_fits(graph: Path, weight_bytes: int, graph_bytes: int) -> None:
    import onnxruntime

    need = weight_bytes + graph_bytes  # the graph structure is stored beside the weights
    if need <= ORT_FORMAT_MAX_BYTES:
        return
    cap = ORT_FORMAT_MAX_BYTES
    fits = [f"{p} (~{_gb(weight_bytes * r)})" for p, r in _QUANT_RATIO.items() if weight_bytes * r + graph_bytes <= cap]
    hint = (f"{' or '.join(fits)} weights would fit, or pruning experts" if fits
            else "even int4 would not fit: prune experts as well")
    raise UserError(
        f"{graph.name}: {_gb(weight_bytes)} of fp32 weights do not fit an ORT-format model (.ort), one flatbuffer "
        f"capped at {cap / 2**30:.2f} GiB ({cap} bytes) that onnxruntime {onnxruntime.__version__} cannot split into external data "
        f"(fp32 holds at most ~{cap / 4 / 1e6:.0f}M parameters); {hint} (int8/int4 and pruning are later work)")


def _write_config(tool_config: Path, dest: Path, ort_file: str, style: str, ort_version: str) -> None:
    """The tool's config with a header naming the bundle's file instead of the temporary path the
    tool records (comment lines; the build's parser skips them)."""
    entries = [line for line in tool_config.read_text().splitlines() if line.strip() and not line.startswith("#")]
    header = [f"# Generated by onnxruntime {ort_version} tools.convert_onnx_models_to_ort (target platform "
              f"{TARGET_PLATFORM}, type reduction {'on' if TYPE_REDUCTION else 'off'}) from:",
              f"# - {ort_file} ({style})",
              f"# Build: --minimal_build extended --include_ops_by_config {CONFIG_FILE}"
              + (" [--enable_reduced_operator_type_support]" if TYPE_REDUCTION else "") + " (docs/mobile.md)"]
    dest.write_text("\n".join(header + entries) + "\n")


def _run_converter(graph: Path, work: Path, optimization_style: str) -> None:
    """onnxruntime's own converter, writing one .ort model and its operator config into work."""
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the tool prints its progress
            convert_onnx_models_to_ort(graph, output_dir=work, optimization_styles=[OptimizationStyle[optimization_style]],
                                       target_platform=TARGET_PLATFORM, enable_type_reduction=TYPE_REDUCTION)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InternalError(f"onnxruntime {onnxruntime.__version__} could not convert {graph} to ORT format: "
                            f"{first}") from e


def _collect(work: Path, graph: Path, bundle_dir: Path, ort_file: str, ops: set, weight_bytes: int,
             optimization_style: str) -> None:
    """Check what the converter wrote and move the model and its config into the bundle."""
    import onnxruntime
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    models, configs = sorted(work.glob("*.ort")), sorted(work.glob("*.config"))
    if len(models) != 1 or len(configs) != 1:
        raise InternalError(f"ORT conversion of {graph} wrote {[p.name for p in models + configs]}, expected one "
                            ".ort model and one .config")
    size = models[0].stat().st_size
    if size > ORT_FORMAT_MAX_BYTES:  # the check before converting estimates; this is the file itself
        raise InternalError(f"{graph}: the ORT-format model came out at {size} bytes, over the 2 GiB flatbuffer "
                            f"cap, though its weights are {weight_bytes} bytes")
    _write_config(configs[0], work / CONFIG_FILE, ort_file, optimization_style, onnxruntime.__version__)
    required, _ = parse_config(str(work / CONFIG_FILE), TYPE_REDUCTION)  # the build's own parser reads it
    kept = {(domain, op) for domain, opsets in (required or {}).items() for names in opsets.values() for op in names}
    if ("com.microsoft", "MoE") in ops and ("com.microsoft", "MoE") not in kept:
        raise InternalError(f"{CONFIG_FILE} for {graph} lacks com.microsoft MoE, which the graph uses")
    os.replace(models[0], bundle_dir / ort_file)
    os.replace(work / CONFIG_FILE, bundle_dir / CONFIG_FILE)


def convert_to_ort(bundle_dir: Path, graph_file: str = "model.onnx", data_file: str = "model.onnx.data",
                   optimization_style: str = "Fixed") -> dict:
    """Convert bundle_dir's ONNX decoder to `model.ort` and `required_operators.config`, then remove
    the ONNX graph and its data. Returns the manifest entry for the converted graph (its inputs and
    outputs are those of the ONNX graph: the contract does not change).

    optimization_style: "Fixed" (default; every optimization applied now, the graph is final) or
    "Runtime" (basic optimizations now, others recorded and replayed at load when the app sets
    `session.enable_saved_runtime_optimizations=1`; meant for compiling EPs such as CoreML).
    """
    if optimization_style not in OPTIMIZATION_STYLES:
        raise UserError(f"optimization style must be one of {', '.join(OPTIMIZATION_STYLES)}, "
                        f"got {optimization_style!r}")
    import onnxruntime

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs an INFO line per config
    bundle_dir = Path(bundle_dir)
    graph = bundle_dir / graph_file
    ort_file = Path(graph_file).with_suffix(".ort").name  # model.onnx -> model.ort
    if not graph.is_file():
        raise BundleError(f"{graph}: missing; nothing to convert to ORT format")
    try:
        weight_bytes, locations, ops = inspect_onnx(graph)
    except Exception as e:  # onnx raises DecodeError and friends for a damaged file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{graph}: not a readable ONNX model ({why})") from None
    missing = sorted(loc for loc in locations if not (bundle_dir / loc).is_file())
    if missing:
        raise BundleError(f"{bundle_dir / missing[0]}: external data of {graph_file} is missing")
    _check_fits(graph, weight_bytes, graph.stat().st_size)
    work = Path(tempfile.mkdtemp(prefix=".ort-convert-", dir=bundle_dir))
    try:
        _run_converter(graph, work, optimization_style)
        _collect(work, graph, bundle_dir, ort_file, ops, weight_bytes, optimization_style)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The bundle ships only the ORT model: the ONNX graph and its weights go.
    graph.unlink()
    for name in {data_file, *locations}:
        (bundle_dir / name).unlink(missing_ok=True)
    return {
        "file": ort_file, "format": "ort", "required_operators": CONFIG_FILE, "optimization_style": optimization_style,
        "onnxruntime_version": onnxruntime.__version__, "bytes": (bundle_dir / ort_file).stat().st_size,
        "target_platform": TARGET_PLATFORM, "type_reduction": TYPE_REDUCTION,
        # session config entries the app must set for this model (docs/mobile.md)
        "session_config": {RUNTIME_OPT_ENTRY: "1"} if optimization_style == "Runtime" else {},
    }
