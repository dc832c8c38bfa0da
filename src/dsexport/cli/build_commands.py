"""Build-side commands: `build`, `plan` (the same plan, printed; torch-free) and `calibrate`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsexport.core.errors import UserError

from ..table import format_table, human_bytes
from .app import Progress, cli, require_build_side, resolve_target


def build_options(fn):
    """The flags that decide a build, shared by `build` and `plan` (so `plan` shows what `build` does)."""
    options = [
        click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
                     help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer). "
                          "Default: the small trained model that ships with dsexport."),
        click.option("--precision", default=None, help="Weight precision (default: the target's)."),
        click.option("--moe-lowering", default=None, help="Override the target's MoE lowering (see docs/lowering.md)."),
        click.option("--moe-shards", default=None, type=click.IntRange(1, 64),
                     help="Split each expert in N slices for N threads (default: the target's; docs/lowering.md)."),
        click.option("--max-context", "--context", "max_context", default=None, type=click.IntRange(2),
                     help="Context the bundle is planned for (default: the target's, at most the model's)."),
        click.option("--tensorrt", "tensorrt", default=None,
                     help="TensorRT version the graphs must parse on (TensorRT targets; default: the target's)."),
        click.option("--force", is_flag=True, help="Build even when the memory plan says the target cannot hold it."),
        click.option("--block-size", default="32", show_default=True, type=click.Choice(["32", "64", "128"]),
                     help="Quantization block: weights per scale (int8/int4)."),
        click.option("--activations", default="int8", show_default=True, type=click.Choice(["int8", "fp32"]),
                     help="int8: quantized kernels round their inputs per block (ONNX Runtime's fast path); fp32: "
                          "exact, slower (8-bit experts always round; docs/quantization.md)."),
        click.option("--expert-block-size", default=None, type=click.Choice(["32", "64", "128"]),
                     help="Routed experts' quantization block, when it should differ from --block-size."),
        click.option("--zero-points", is_flag=True,
                     help="Asymmetric quantization: a zero point per block besides the scale (ONNX Runtime targets)."),
        click.option("--quantize", "quantize", multiple=True, metavar="PART=BITS",
                     help="Per part bits over the precision's preset: PART in attention, shared_experts, routed_experts, "
                          "dense_mlp, lm_head; BITS 4, 8, 6 (not routed_experts: 6-bit levels stored as 8-bit, read at 6 bits by the native decoder) or none (fp32). Repeatable; docs/quantization.md."),
        click.option("--expert-bits", default=None, metavar="BITS:FRACTION",
                     help="Give the FRACTION of routed experts that matter most (by --prune-by, from --calib) BITS "
                          "bits, e.g. 8:0.25 on an int4 build (docs/quantization.md)."),
        click.option("--paged/--no-paged", default=None,
                     help="Keep routed experts in a store the runtime pages (docs/paging.md). Default: paged when the "
                          "target's memory cannot hold every expert and its backend can page."),
        click.option("--expert-cache-mb", default=None, type=float,
                     help="A paged bundle's default expert cache in MiB (default: what the target's memory plan leaves)."),
        click.option("--mtp/--no-mtp", "mtp", default=None,
                     help="Include the checkpoint's MTP module as a drafting graph (default: when it has one and the "
                          "bundle is one ONNX Runtime graph; docs/mtp.md)."),
        click.option("--prune", type=float, default=None,
                     help="Remove this fraction of routed experts (0..1), chosen from --calib (docs/pruning.md)."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="A calibration profile directory (`dsexport calibrate`), or a text/JSONL file to calibrate on now."),
        click.option("--prune-by", default="output-mass", show_default=True,
                     type=click.Choice(["frequency", "contribution", "output-mass"]),
                     help="What keeps an expert (docs/pruning.md): output-mass when deployment text is like the "
                          "calibration text, contribution (REAP) when it may not be."),
        click.option("--prune-scope", default="global", show_default=True, type=click.Choice(["per-layer", "global"]),
                     help="global: one budget over all MoE layers (scores divided by their layer mean); per-layer: "
                          "each layer loses the fraction."),
        click.option("--prune-method", default="drop", show_default=True, type=click.Choice(["drop", "merge"]),
                     help="drop: remove the experts; merge: fold each removed expert into the kept expert its router "
                          "row is most like, neurons aligned, weighted by routed tokens (docs/pruning.md)."),
        click.option("--quant-method", default="rtn", show_default=True, type=click.Choice(["rtn", "awq"]),
                     help="rtn: round to nearest; awq: rescale the MoE layers by activation statistics of --calib "
                          "text first, an exact rewrite that rounds better (docs/quantization.md)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _parse_quantize(items: tuple[str, ...]) -> dict[str, int | None] | None:
    out: dict[str, int | None] = {}
    for item in items:
        part, _, bits = item.partition("=")
        if bits not in ("4", "6", "8", "none"):
            raise UserError(f"--quantize {item!r}: expected PART=4, PART=6, PART=8 or PART=none")
        out[part.strip().replace("-", "_")] = None if bits == "none" else int(bits)
    return out or None


def _parse_expert_bits(spec: str | None) -> tuple[int, float] | None:
    if spec is None:
        return None
    try:
        bits, fraction = spec.split(":")
        return int(bits), float(fraction)
    except ValueError:
        raise UserError(f"--expert-bits {spec!r}: expected BITS:FRACTION, e.g. 8:0.25") from None


def _profile(model_dir: Path, calib: Path | None, needed: bool):
    """The calibration profile --calib names: a profile directory, or a data file to calibrate on now."""
    if calib is None:
        return None
    if not needed:
        raise UserError("--calib is given without --prune FRACTION, --expert-bits or --quant-method awq")
    from dsexport.calibration.profile import PROFILE_FILE, load_profile

    if calib.is_dir() or calib.name == PROFILE_FILE:
        return load_profile(calib)
    require_build_side("build --calib DATA_FILE")
    from dsexport.calibration.run import calibrate

    click.echo(f"calibrating on {calib} (64 sequences of 256 tokens; `dsexport calibrate` sets more)", err=True)
    return calibrate(model_dir, [calib], samples=64, seq_len=256, progress=Progress())


def make_request(model_dir, target, out_dir=None, overwrite=False, **flags):
    """(BuildConfig, profile) from the flags `build` and `plan` share."""
    from dsexport import EMBEDDED_MODEL
    from dsexport.build.plan import BuildConfig
    from dsexport.calibration.pruning import PruneConfig

    if model_dir is None:
        model_dir = EMBEDDED_MODEL
        click.echo(f"no --model: using the embedded model ({model_dir})", err=True)
    elif model_dir.name == "config.json":
        model_dir = model_dir.parent
    prune = flags.pop("prune")
    expert_bits = _parse_expert_bits(flags.pop("expert_bits"))
    prune_by, scope, method = flags.pop("prune_by"), flags.pop("prune_scope"), flags.pop("prune_method")
    calib = flags.pop("calib")
    if method != "drop" and prune is None:
        raise UserError(f"--prune-method {method} needs --prune FRACTION")
    if prune is None and calib is None and expert_bits is None:
        pass
    elif prune is not None and calib is None:
        raise UserError("--prune needs --calib: a calibration profile (`dsexport calibrate`) or a data file")
    elif expert_bits is not None and calib is None:
        raise UserError("--expert-bits needs --calib: a calibration profile (`dsexport calibrate`)")
    quant_method = flags["quant_method"]
    if quant_method == "awq" and calib is None:
        raise UserError("--quant-method awq needs --calib: calibration text (or a profile of it) to search the scales on")
    profile = _profile(model_dir, calib, prune is not None or expert_bits is not None or quant_method == "awq")
    expert_block = flags.pop("expert_block_size")
    request = BuildConfig(
        model_dir, out_dir, resolve_target(target), overwrite=overwrite,
        prune=PruneConfig(prune, prune_by, scope, method) if prune is not None else None,
        block_size=int(flags.pop("block_size")), quantize=_parse_quantize(flags.pop("quantize")),
        expert_bits=expert_bits, expert_block_size=int(expert_block) if expert_block else None, **flags)
    return request, profile


@cli.command()
@click.option("--target", default="x86-cpu", show_default=True, help="Device target (`dsexport targets`).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out, once the new one is complete.")
@click.option("--allow-no-tokenizer", is_flag=True,
              help="Build from a checkpoint without tokenizer.json (the bundle then takes token ids only).")
@build_options
def build(model_dir, target, out_dir, overwrite, allow_no_tokenizer, **flags) -> None:
    """Export a checkpoint into a bundle for a target."""
    require_build_side("build")
    from dsexport.build.pipeline import build_bundle
    from dsexport.build.plan import resolve_plan

    request, profile = make_request(model_dir, target, out_dir, overwrite, allow_no_tokenizer=allow_no_tokenizer,
                                    **flags)
    plan = resolve_plan(request, profile)
    if plan.pruning:
        click.echo(f"pruning {plan.pruning.removed_experts} of {plan.pruning.routed_experts} routed experts by "
                   f"{plan.pruning.criterion} ({plan.pruning.scope})", err=True)
    m = build_bundle(request, Progress(), profile, plan).manifest
    click.echo(format_table(["file", "size"], [[name, human_bytes(e.bytes)] for name, e in m.files.items()],
                            align_right={1}))
    if m.quantization is not None:
        q = m.quantization
        click.echo("quantized: " + ", ".join(f"{part} int{b}" for part, b in q.bits.items())
                   + f", {q.scheme}, blocks of {q.block_size}"
                   + (" (int8 per channel)" if 8 in q.per_channel_bits else "") + "; router, norms, embeddings fp32"
                   + ("; absorbed W_UK/W_UV fp16 values" if q.absorbed == "fp16" else ""))
    click.echo(f"wrote {out_dir}: target {m.target.name}, precision {m.precision}, MoE lowering {m.export.moe_lowering}"
               + (f" (prompts: {m.export.prefill_moe_lowering})" if m.export.prefill_moe_lowering else ""))
    if m.tensorrt is not None:
        for line in tensorrt_summary(m):
            click.echo(line)


def tensorrt_summary(manifest) -> list[str]:
    trt, lines = manifest.tensorrt, []
    plan = trt.engine_plan
    for version, graphs in trt.checks.items():
        verdict = ", ".join(f"{role} {'ok' if r['ok'] else str(len(r['errors'])) + ' errors'} ({r['nodes']} nodes)"
                            for role, r in graphs.items())
        lines.append(f"TensorRT {version} check: {verdict}" + ("  <- build target" if version == trt.checked_against else ""))
    flags = "strongly typed" if plan.strongly_typed else ("flags " + "+".join(plan.builder_flags) if plan.builder_flags
                                                          else "fp32")
    lines.append(f"engine plan: {plan.precision} ({flags}, TF32 {'on' if plan.tf32 else 'off'}), context {plan.context}, "
                 f"prefill chunks of {plan.prefill_tokens} tokens, workspace {human_bytes(plan.workspace_bytes)}; "
                 "on the device: dsexport engine BUNDLE")
    return lines


@cli.command()
@click.option("--target", required=True, help="Device target (`dsexport targets`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@build_options
def plan(model_dir, target, as_json, **flags) -> None:
    """The plan `build` would execute with these flags: memory fit, quantization, pruning (experts
    removed and bytes saved per layer), paging, MTP, engine plan; nothing is written."""
    from dsexport.build.plan import resolve_plan

    request, profile = make_request(model_dir, target, **flags)
    p = resolve_plan(request, profile, for_build=False)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
        return
    from .plan_output import print_plan

    print_plan(p)


@cli.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="Checkpoint directory (default: the embedded model).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Text, JSONL with \"text\", or chat JSONL with \"messages\" (repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Profile directory to write.")
@click.option("--samples", default=128, show_default=True, type=click.IntRange(1), help="Sequences to run.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per sequence (at most).")
@click.option("--min-tokens", default=8, show_default=True, type=click.IntRange(1),
              help="An expert routed fewer tokens is reported as not covered.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile's summary as JSON.")
def calibrate(model_dir, data, out_dir, samples, seq_len, min_tokens, as_json) -> None:
    """Record which experts calibration text routes to, per layer: profile.json and heatmaps."""
    require_build_side("calibrate")
    import numpy as np

    from dsexport import EMBEDDED_MODEL
    from dsexport.calibration.heatmap import write_heatmap
    from dsexport.calibration.profile import SUMMARY_HEADERS
    from dsexport.calibration.run import calibrate as run_calibration

    profile = run_calibration(model_dir or EMBEDDED_MODEL, list(data), samples, seq_len, min_tokens, Progress())
    path = profile.save(out_dir)
    experts = profile.model["n_routed_experts"]
    for name, values in (("frequency", lambda lp: np.asarray(lp.selected, float) / max(profile.tokens, 1)),
                         ("contribution", lambda lp: np.asarray(lp.contribution, float))):
        grid = np.full((len(profile.layers), experts), np.nan)
        for r, lp in enumerate(profile.layers):
            grid[r, lp.expert_ids] = values(lp)
        write_heatmap(out_dir / f"{name}.png", grid)
    uncovered = sum(len(lp.not_covered(min_tokens)) for lp in profile.layers)
    total = sum(len(lp.expert_ids) for lp in profile.layers)
    if as_json:
        click.echo(json.dumps({"profile": str(path), "tokens": profile.tokens, "sequences": profile.samples,
                               "seconds": profile.seconds, "not_covered": uncovered, "experts": total,
                               "layers": [dict(zip(SUMMARY_HEADERS, row)) for row in profile.summary_rows()]}, indent=2))
        return
    click.echo(format_table(SUMMARY_HEADERS, profile.summary_rows(), align_right=set(range(len(SUMMARY_HEADERS)))))
    click.echo(f"{profile.samples} sequences, {profile.tokens} tokens in {profile.seconds:.1f} s; coverage: "
               f"{total - uncovered}/{total} experts routed at least {min_tokens} tokens"
               + (f" ({uncovered} not covered: too few tokens to judge; more --samples would)" if uncovered else ""))
    click.echo(f"wrote {path}, {out_dir / 'frequency.png'}, {out_dir / 'contribution.png'}")
