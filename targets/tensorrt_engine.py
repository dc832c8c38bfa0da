"""Build a bundle's TensorRT engines on the device itself (`dsexport engine BUNDLE`).

Engines are tied to the GPU and the TensorRT release, so they cannot be built on the export
machine: the bundle carries ONNX graphs and an engine plan (`manifest.tensorrt.engine_plan`,
written at export time), and this module turns the plan into `engines/*.plan` on the device,
then records them in the manifest with their checksums (docs/engine.md).

API differences handled (TensorRT 8.5.3, 10.3 and 11.4 Python bindings read for this; NVIDIA's
TensorRT 8.x->10.x and 10.x->11.x migration guides; onnx-tensorrt release/8.5-GA and 10.1-GA):
- EXPLICIT_BATCH: required by 8.x for ONNX, deprecated and ignored by 10.x, gone in 11.
- STRONGLY_TYPED: a network creation flag since 10.0 (9.x previews); always on in 11.
- BuilderFlag FP16/INT8/OBEY_PRECISION_CONSTRAINTS: gone in 11 (precision must be in the graph).
- Workspace: `set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)` since 8.4; `max_workspace_size` before.
- Parser errors: `node_name()`/`node_operator()` since 10.0; 8.5 has `node()` (an index) and `desc()`.
- TF32 is on by default for fp32 layers on Ampere and later (Orin too): the plan says whether to clear it.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from dsexport.core.errors import BundleError, InternalError, UserError
from dsexport.core.files import atomic_write, confined, sha256_file
from dsexport.core.jsonio import dump_json
from dsexport.core.manifest import MANIFEST_FILE, FileEntry, Manifest
from dsexport.core.sections import EngineGraph, EnginePlan, EnginesSection
from dsexport.runtime.bundle import Bundle, read_bundle, verify_files
from dsexport.runtime.tensorrt_backend import device_info, engine_mismatch, import_tensorrt

from .profiles import profile_problems

__all__ = ["build_engines", "engine_mismatch", "engine_plan", "check_profiles", "builder_flags", "fp32_layer",
           "record_engines"]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")  # weak-typing flags TensorRT 11 removed
WEAK_TYPING_FLAGS = PRECISION_FLAGS + ("OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
_UNIQUE_SUFFIX = re.compile(r"_\d+$")  # onnx-tensorrt names extra layers of one node NAME_1, NAME_2, ...


def engine_plan(manifest: Manifest, directory: Path) -> EnginePlan:
    """The manifest's engine plan (its file names were checked when the manifest was read)."""
    if manifest.tensorrt is None:
        raise BundleError(f"{directory}: the manifest has no tensorrt.engine_plan; the bundle was not exported for a "
                          "TensorRT target (dsexport build --target jetson-...)")
    plan = manifest.tensorrt.engine_plan
    if plan.precision not in PRECISIONS:
        raise BundleError(f"tensorrt.engine_plan.precision: {plan.precision!r} is not one of {', '.join(PRECISIONS)}")
    if "decoder" not in plan.graphs:
        raise BundleError("tensorrt.engine_plan.graphs: no decoder graph")
    return plan


def check_profiles(graph: str, inputs: dict[str, list[int]], profiles) -> None:
    """Every profile gives a valid range for every dynamic network input (-1 dims), and names only inputs."""
    problems = profile_problems(graph, inputs, profiles)
    if problems:
        raise BundleError(problems[0])


def builder_flags(plan, available: set[str], trt_version: str) -> list[str]:
    """The BuilderFlag names to set (plan: an EnginePlan); a clear error where this TensorRT lacks
    one the plan needs."""
    flags = list(plan.builder_flags or [])
    precision = [f for f in flags if f in PRECISION_FLAGS]
    if plan.strongly_typed and precision:
        raise BundleError(f"tensorrt.engine_plan: a strongly typed plan cannot ask for {', '.join(precision)} "
                          "(the graph carries the precision)")
    missing = [f for f in flags if f not in available]
    weak = [f for f in missing if f in WEAK_TYPING_FLAGS]
    if weak:
        raise UserError(f"TensorRT {trt_version} has no BuilderFlag.{weak[0]} (TensorRT 11 builds only strongly "
                        f"typed networks): the graph must carry the {plan.precision} precision itself (casts, "
                        "Q/DQ); export the bundle with a strongly typed plan for this TensorRT")
    if missing:
        raise UserError(f"TensorRT {trt_version} has no BuilderFlag.{missing[0]}, which the engine plan asks for")
    return flags


def fp32_layer(name: str, patterns: list[str]) -> str | None:
    """The first fnmatch pattern that names this layer (the ONNX node's name, or it with onnx-tensorrt's _N suffix)."""
    for candidate in dict.fromkeys((name, _UNIQUE_SUFFIX.sub("", name))):
        for pattern in patterns:
            if fnmatch.fnmatchcase(candidate, pattern):
                return pattern
    return None


def _write_temp(path: Path, data) -> Path:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a hidden temp file beside path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def record_engines(manifest: Manifest, directory: Path, engines: dict[str, str], written: list[str],
                   trt_version: str, gpu: str, compute_capability: str, precision: str) -> Manifest:
    """The manifest with its `engines` section and the checksums of the files just written."""
    files = dict(manifest.files)
    for rel in written:
        files[rel] = FileEntry((directory / rel).stat().st_size, sha256_file(directory / rel))
    section = EnginesSection(trt_version, gpu, str(compute_capability),
                             datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), precision,
                             dict(engines))
    return dataclasses.replace(manifest, engines=section, files=files)


def _logger(trt, log: Callable[[str], None]):
    class Logger(trt.ILogger):  # warnings go to log; errors are also kept for the one-line message
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # TensorRT's severities: 0 internal error, 1 error, 2 warning, ...
            if int(severity) <= 1:
                self.errors.append(" ".join(str(msg).split()))
            if int(severity) <= 2:
                log(f"TensorRT: {msg}")

    return Logger()


def _parser_errors(parser) -> str:
    parts = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else ""  # 10.0+
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        where = f"node {node or e.node()}" + (f" ({op})" if op else "")
        parts.append(f"{where}: {' '.join(str(e.desc()).split())}")
    return "; ".join(parts[:3]) + (f"; and {len(parts) - 3} more" if len(parts) > 3 else "") or "no parser message"


def _pin_fp32(trt, network, patterns: list[str], log) -> None:
    """Keep the layers named by the plan's patterns in FP32 (weakly typed reduced-precision builds)."""
    floats = {getattr(trt, t) for t in ("float32", "float16", "bfloat16") if hasattr(trt, t)}
    hits = dict.fromkeys(patterns, 0)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pattern = fp32_layer(layer.name, patterns)
        outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if pattern is None or not outputs:
            continue
        layer.precision = trt.float32
        for j in outputs:
            layer.set_output_type(j, trt.float32)
        hits[pattern] += 1
    log(f"  kept in FP32: {sum(hits.values())} layers ({', '.join(f'{p} {n}' for p, n in hits.items())})")


@dataclasses.dataclass
class _Build:
    trt: object
    builder: object
    logger: object
    plan: EnginePlan
    flags: list[str]
    cache_bytes: bytes
    log: Callable[[str], None]
    bundle: Bundle


def _build_graph(b: _Build, name: str, graph: EngineGraph, directory: Path):
    trt, plan, log = b.trt, b.plan, b.log
    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(creation, "EXPLICIT_BATCH"):  # 8.x: ONNX needs it; 10.x: ignored
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if plan.strongly_typed:
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise UserError(f"TensorRT {trt.__version__} cannot build strongly typed networks (TensorRT 10 or later "
                            "can); use a bundle exported for this TensorRT")
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = b.builder.create_network(flags)
    parser = trt.OnnxParser(network, b.logger)
    path = b.bundle.path(graph.file, f"tensorrt.engine_plan.graphs.{name}.file")
    # parse_from_file, not parse(bytes): external data (model.onnx.data) resolves beside the model file
    if not parser.parse_from_file(str(path)):
        raise BundleError(f"{path.name}: TensorRT {trt.__version__}'s ONNX parser rejected the graph: "
                          f"{_parser_errors(parser)}")
    inputs = {network.get_input(i).name: [int(d) for d in network.get_input(i).shape]
              for i in range(network.num_inputs)}
    check_profiles(name, inputs, graph.profiles)

    config = b.builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # 8.4+
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_bytes))
    else:
        config.max_workspace_size = int(plan.workspace_bytes)
    for flag in b.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if hasattr(trt.BuilderFlag, "TF32"):
        (config.set_flag if plan.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    patterns = list(plan.fp32_layers or [])
    if patterns and plan.precision != "fp32" and not plan.strongly_typed:
        if not hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
            raise UserError(f"TensorRT {trt.__version__} has no per-layer precision (TensorRT 11 builds only strongly "
                            "typed networks): the graph must carry its FP32 layers itself")
        _pin_fp32(trt, network, patterns, log)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for profile in graph.profiles:
        p = b.builder.create_optimization_profile()
        for tensor, rng in profile.items():
            p.set_shape(tensor, list(rng.min), list(rng.opt), list(rng.max))
        config.add_optimization_profile(p)
    try:
        cache = config.create_timing_cache(b.cache_bytes)
        usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError, ValueError):  # an unreadable cache file
        usable = False
    if not usable:
        log("  the timing cache is from another GPU or TensorRT release, or unreadable: starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    b.logger.errors.clear()
    serialized = b.builder.build_serialized_network(network, config)
    if serialized is None:
        last = b.logger.errors[-1] if b.logger.errors else "no error message"
        raise InternalError(f"TensorRT {trt.__version__} could not build the {name} engine: {last}")
    b.cache_bytes = bytes(config.get_timing_cache().serialize())
    return serialized


def build_engines(bundle_dir: Path, log: Callable[[str], None] = print, force: bool = False) -> EnginesSection:
    """Build every engine of the bundle's plan on this GPU; returns the manifest's new `engines` section."""
    bundle = read_bundle(bundle_dir, verify=False)
    directory, manifest = bundle.directory, bundle.manifest
    plan = engine_plan(manifest, directory)
    targets = {name: g.engine for name, g in plan.graphs.items()}
    cache_rel = plan.timing_cache
    existing = [rel for rel in targets.values() if (directory / rel).exists()]
    built = manifest.engines
    if built is not None and not force:
        raise UserError(f"{directory}: engines already built (TensorRT {built.tensorrt_version} on {built.gpu}, "
                        f"{built.built_utc}); pass --force to rebuild them")
    if existing and not force:
        raise UserError(f"{directory}: {', '.join(existing)} exist but the manifest lists no engines (an unfinished "
                        "build?); pass --force to rebuild them")

    trt = import_tensorrt("`dsexport engine`")
    flags = builder_flags(plan, {n for n in dir(trt.BuilderFlag) if n.isupper()}, trt.__version__)
    gpu, cc = device_info()
    checked = str(plan.tensorrt).split(".")
    if trt.__version__.split(".")[:len(checked)] != checked:
        log(f"warning: the graphs were checked against TensorRT {plan.tensorrt}; this is {trt.__version__}")
    # The graphs and their weights must be the ones exported (engines from an earlier build are replaced).
    outputs = set(targets.values()) | ({cache_rel} if cache_rel else set())
    verify_files(bundle, skip=outputs)

    logger = _logger(trt, log)
    state = _Build(trt, trt.Builder(logger), logger, plan, flags, b"", log, bundle)
    if cache_rel and (directory / cache_rel).is_file():
        state.cache_bytes = confined(directory, cache_rel, "tensorrt.engine_plan.timing_cache", BundleError).read_bytes()
    log(f"building on {gpu} (compute capability {cc}) with TensorRT {trt.__version__}, precision {plan.precision}")
    # Every engine goes to a temp file first and all are renamed into place only once all are built,
    # so a failed (re)build leaves the previous engines and manifest as they were.
    pending: dict[str, Path] = {}
    try:
        for name, graph in plan.graphs.items():
            start = time.perf_counter()
            log(f"{name}: {graph.file} -> {targets[name]} ({len(graph.profiles)} optimization profile(s))")
            serialized = _build_graph(state, name, graph, directory)
            pending[targets[name]] = _write_temp(directory / targets[name], serialized)
            del serialized  # the host copy of an engine is as large as its weights
            log(f"  {pending[targets[name]].stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
        if cache_rel:
            pending[cache_rel] = _write_temp(directory / cache_rel, state.cache_bytes)
        for rel in list(pending):
            os.replace(pending.pop(rel), directory / rel)
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
    written = list(targets.values()) + ([cache_rel] if cache_rel else [])
    updated = record_engines(manifest, directory, targets, written, trt.__version__, gpu, cc, plan.precision)
    atomic_write(directory / MANIFEST_FILE, dump_json(updated.to_json()) + "\n")
    return updated.engines
