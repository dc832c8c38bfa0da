"""Build a bundle: the staged pipeline from checkpoint directory to verified bundle directory.

    plan -> export (the plan's backend) -> tokenizer -> manifest -> verify (ONNX Runtime runs it)
         -> golden outputs from the reference -> checksums -> publish

The plan (dsexport/build/plan.py) is resolved first, so a build that would be refused stops
before any work. The directory is the hand-off: everything is written into a hidden staging
directory beside --out and published at the end (dsexport/build/publish.py), so an interrupted
build never leaves something that looks like a bundle and an existing bundle is replaced only
by a finished one.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path
from typing import Callable

from dsexport.calibration.profile import Profile
from dsexport.core.config import ModelConfig, parameter_counts
from dsexport.core.errors import CheckpointError, InternalError, UserError
from dsexport.core.files import atomic_write, copy_regular_file, fsync_directory, sha256_file
from dsexport.core.jsonio import dump_json
from dsexport.core.quant import AWQ_FILE
from dsexport.core.manifest import MANIFEST_FILE, ExportInfo, FileEntry, Graphs, Manifest, Target
from dsexport.core.sections import Stats
from dsexport.runtime.tokenizer import TOKENIZER_FILES
from dsexport.runtime.golden import GOLDEN_FILE

from .backends import EXPORTERS, Exported
from .plan import BuildConfig, BuildPlan, resolve_plan
from .publish import check_output, publish, staging_directory

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest: Manifest
    plan: BuildPlan


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


def model_stats(cfg: ModelConfig, weight_bytes: int) -> Stats:
    total, active = parameter_counts(cfg)
    per_weight = weight_bytes / total
    return Stats(total, active, weight_bytes, int(active * per_weight), cfg.latent_dim * 4 * cfg.num_hidden_layers)


def copy_tokenizer(checkpoint: Path, staging: Path) -> tuple[str, ...]:
    """The checkpoint's tokenizer files: regular files inside it only, never a symlink out."""
    return tuple(name for name in TOKENIZER_FILES
                 if copy_regular_file(checkpoint / name, staging / name, checkpoint, CheckpointError))


def make_manifest(plan: BuildPlan, exported: Exported, tokenizer_files: tuple[str, ...]) -> Manifest:
    """The manifest of the plan and what the export wrote (files and golden are added later)."""
    export = ExportInfo(exported.decoder.moe_lowering, plan.moe_shards, plan.prefill_moe_lowering, plan.opset, plan.mtp)
    target = Target(plan.target.name, plan.target.backend, plan.target.execution_providers)
    return Manifest(
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        producer=_versions(),
        source={"checkpoint": str(Path(plan.request.model_dir).resolve().name), "config_sha256": plan.config_sha256},
        model=plan.config, target=target, precision=plan.precision, export=export, context=plan.context,
        graphs=Graphs(exported.decoder, exported.mtp), tokenizer_files=tokenizer_files,
        stats=model_stats(plan.config, exported.weight_bytes), files={}, memory_plan=plan.memory_json(),
        quantization=plan.quant, tensorrt=exported.tensorrt, mobile=exported.mobile, pruning=plan.pruning,
        paging=exported.paging, native=exported.native)


def checksum_files(staging: Path, manifest: Manifest, progress: Progress) -> Manifest:
    """The manifest with every file of the staging directory listed with its size and sha256."""
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    files = {}
    progress("checksums", 0, len(names))
    for i, name in enumerate(names):
        files[name] = FileEntry((staging / name).stat().st_size, sha256_file(staging / name))
        progress("checksums", i + 1, len(names))
    return manifest.with_files(files)


def write_manifest(staging: Path, manifest: Manifest) -> None:
    atomic_write(staging / MANIFEST_FILE, dump_json(manifest.to_json()) + "\n")


def verify(staging: Path, plan: BuildPlan, reader, manifest: Manifest, progress: Progress) -> Manifest:
    """Load the bundle through the runtime and run it; record golden outputs from the reference
    (exporter/golden.py), which also checks that the bundle's greedy tokens are the reference's."""
    import numpy as np

    from dsexport.exporter.golden import golden_generations, logit_tolerance, make_golden, quality_windows
    from dsexport.runtime import Engine

    progress("verifying", 0, 2)
    engine = Engine.load(staging, verify=False, decoder="onnxruntime")  # the graphs, what the bundle ships
    logits, _ = engine.forward(np.array([[0]]), np.array([[0]]), np.ones((1, 1), np.int64), engine.empty_cache(1))
    if logits.shape != (1, 1, plan.config.vocab_size) or not np.isfinite(logits).all():
        raise InternalError(f"exported graph produced logits of shape {logits.shape} / non-finite values")
    progress("verifying", 1, 2)
    prompts, outputs = golden_generations(engine, plan.config.vocab_size)
    compressed = plan.quant is not None or plan.config.kept_experts is not None
    windows = quality_windows(engine) if compressed else []
    graphs = manifest.graphs
    if graphs.mtp is not None:  # the MTP graph against the torch MTPModule, on the decoder graph's hidden states
        from dsexport.exporter.mtp_export import verify_mtp

        check = verify_mtp(reader, engine, plan.quant, logit_tolerance(plan.quant))
        graphs = dataclasses.replace(graphs, mtp=dataclasses.replace(graphs.mtp, verify=check))
    engine.close()
    del engine  # the session's memory goes before the reference model's arrives
    final = dataclasses.replace(manifest, graphs=graphs, golden_file=GOLDEN_FILE)
    golden = make_golden(reader, prompts, outputs, plan.quant, windows, seal=final.seal())
    atomic_write(staging / GOLDEN_FILE, dump_json(golden, indent=None))
    progress("verifying", 2, 2)
    return final


def verify_native(staging: Path, manifest: Manifest, progress: Progress) -> None:
    """Where this machine can run the native decoder, it must pass every check of the bundle's
    golden outputs (`dsexport validate`'s) that the graphs in ONNX Runtime pass: a native section
    that reads the weights wrongly fails the build rather than the user's first run. Relative, not
    absolute: a lossy bundle (a random-weight model at int4, say) may miss a threshold with either
    decoder, and that is validate's verdict to give, not the build's."""
    from dsexport.runtime import Engine
    from dsexport.runtime.golden import validate_golden
    from dsexport.runtime.validate import Thresholds

    if manifest.native is None or manifest.golden_file is None:
        return
    progress("native check", 0, 2)
    limits = Thresholds.for_bundle(manifest)
    reports = {}
    for decoder in (None, "onnxruntime"):  # one engine at a time: the weights are held once
        engine = Engine.load(staging, verify=False, decoder=decoder)
        skip = decoder is None and engine.backend.name != "native"  # this machine runs ONNX Runtime anyway
        if not skip:
            reports[decoder] = {c.name: c for c in validate_golden(engine, limits).checks}
        if not skip and decoder is None and manifest.native.mtp is not None:
            check_native_mtp(engine, manifest.rounds_activations)
        engine.close()
        del engine  # its weights go before the next engine's arrive
        if skip:
            return
        progress("native check", len(reports), 2)
    rounding = manifest.rounds_activations

    def worse(c, graph) -> bool:
        if c.passed or not graph.passed:
            return False
        if not rounding:  # exact kernels: the two decoders agree to ~1e-5
            return True
        # int8 activations: a rounding tie can flip a token in either decoder; fail on clear margins only
        if c.name == "greedy_match_fraction":
            return False
        return c.value < graph.value - 0.05 if c.kind == "min" else c.value > 2 * graph.value

    failed = [f"{name} {c.value:.4g} ({c.kind} {c.limit:.4g}; ONNX Runtime {reports['onnxruntime'][name].value:.4g})"
              for name, c in reports[None].items() if worse(c, reports["onnxruntime"][name])]
    if failed:
        raise InternalError("the native decoder fails golden checks the graphs pass: " + "; ".join(failed))


def check_native_mtp(engine, rounding: bool, ids=None) -> float:
    """The native MTP block against the bundle's MTP graph on the decoder's own hidden states,
    through the block's cache in steps of several, 1 and 2 tokens (as drafting runs it): max |logit
    diff| at most 1e-3 (measured ~1e-5 on the embedded model at fp32 and int4), 0.5 where int8
    activations round (a flipped rounding moves a logit by far less; wrong weights by far more)."""
    import numpy as np

    from dsexport.runtime.speculative import MTPGraph

    if ids is None:
        ids = np.random.default_rng(0).integers(0, engine.config.vocab_size, size=(1, 12))
    tokens = ids.shape[1]
    ones = lambda n: np.ones((1, n), np.int64)  # noqa: E731
    _, hidden, _ = engine.backend.forward_hidden(ids, np.arange(tokens)[None], ones(tokens), engine.empty_cache(1))
    last = []
    for drafter in (engine.backend.drafter(head="bundle"), MTPGraph.load(engine.bundle)):
        cache, start, out = drafter.empty_cache(1), 0, []
        for step in (tokens - 4, 1, 2):
            logits, cache = drafter.forward(hidden[:, start:start + step], ids[:, start + 1:start + step + 1],
                                            np.arange(start, start + step)[None], ones(start + step), cache)
            out.append(logits[0, -1])
            start += step
        last.append(np.stack(out))
    diff = float(np.abs(last[0] - last[1]).max())
    if not diff <= (0.5 if rounding else 1e-3):
        raise InternalError(f"the native MTP block disagrees with the MTP graph: max |logit diff| {diff:.3g}")
    return diff


def merge_experts(reader, plan: BuildPlan, profile: Profile | None) -> BuildPlan:
    """With --prune-method merge: which kept expert absorbs each removed one, into the plan's record."""
    if plan.pruning is None or plan.pruning.method != "merge" or plan.pruning.merges:
        return plan
    if profile is None:
        raise UserError("--prune-method merge needs the calibration profile (--calib) that chose the experts")
    from dsexport.calibration.merging import plan_merges

    return dataclasses.replace(plan, pruning=plan_merges(reader, plan.pruning, profile))


def awq_scales(reader, plan: BuildPlan, profile: Profile | None, progress: Progress) -> dict | None:
    """With --quant-method awq: the scales searched on the calibration text the profile records."""
    if plan.quant is None or plan.quant.method != "awq":
        return None
    from dsexport.calibration.awq import search_scales
    from dsexport.calibration.data import reload_sequences

    sequences = reload_sequences(profile, reader.dir)
    scales, _ = search_scales(reader, sequences, plan.quant, progress)
    return scales


def build_bundle(request: BuildConfig, progress: Progress = lambda stage, done, total: None,
                 profile: Profile | None = None, plan: BuildPlan | None = None) -> BuildResult:
    from dsexport.exporter.awq import save_scales, with_awq
    from dsexport.exporter.checkpoint import CheckpointReader

    if request.out_dir is None:
        raise UserError("no output directory given (--out)")
    plan = plan or resolve_plan(request, profile)
    out = Path(request.out_dir)
    check_output(out, request.overwrite, [Path(request.model_dir)])
    progress("loading", 0, 1)
    reader = CheckpointReader(request.model_dir, plan.source_config).with_config(plan.config)
    plan = merge_experts(reader, plan, profile)
    reader = reader.with_merges(plan.pruning.merges if plan.pruning else None)
    progress("loading", 1, 1)
    scales = awq_scales(reader, plan, profile, progress)
    reader = with_awq(reader, scales)
    with staging_directory(out) as staging:
        if scales:
            save_scales(scales, staging / AWQ_FILE)
        exported = EXPORTERS[plan.backend](reader, staging, plan, progress)
        manifest = make_manifest(plan, exported, copy_tokenizer(reader.dir, staging))
        # the runtime loads only what the manifest lists: list everything before verifying
        write_manifest(staging, checksum_files(staging, manifest, progress))
        manifest = verify(staging, plan, reader, manifest, progress)
        manifest = checksum_files(staging, manifest, progress)
        write_manifest(staging, manifest)
        verify_native(staging, manifest, progress)
        fsync_directory(staging)
        check_output(out, request.overwrite, [Path(request.model_dir)])  # nothing appeared meanwhile
        publish(staging, out)
    return BuildResult(out, manifest, plan)
