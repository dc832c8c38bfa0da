"""`dsexport distill`: train the compressed model (pruned experts, simulated quantization) to match
the original on calibration text, and write it as a Hugging Face checkpoint (docs/distill.md).

Single process by default; under `torchrun --nproc-per-node N` the same command runs data
parallel (torch.distributed: gloo on CPUs, NCCL on GPUs; DistributedDataParallel) and rank 0
writes the output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from dsexport.core.errors import UserError

from ..table import format_table, human_bytes
from .app import cli, require_build_side

PRECISIONS = ("fp32", "int8", "int4")


class DistillProgress:
    """Stage progress with an ETA on stderr (rank 0 only): a live line on a terminal, else a line
    per held-out evaluation."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty, self.quiet = sys.stderr.isatty(), quiet
        self.start = self.stage_start = time.perf_counter()
        self.stage = None

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.stage_start = stage, now
        eta = ""
        if stage == "distill" and 0 < done < total:
            eta = f", ETA {(now - self.stage_start) / done * (total - done):.0f} s"
        unit = " steps" if stage == "distill" else ""
        text = f"{stage}: {done}/{total}{unit}  {note}  [{now - self.start:.1f} s{eta}]"
        if self.tty:
            click.echo("\r" + text + " " * 8, nl=done >= total or stage == "distill", err=True)
        elif note or done >= total:
            click.echo(text, err=True)


def _ranks(device: str):
    """torch.distributed's process group when started by torchrun (WORLD_SIZE > 1: gloo on CPUs,
    NCCL with --device cuda, one GPU per rank), else one process."""
    import torch

    from dsexport.calibration.distill import Ranks

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(), device
    import torch.distributed as dist

    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    return Ranks.current(), device


def _check_out(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that is, holds or lies inside the checkpoint, or that holds anything but a
    previous distill output (replaced only with --overwrite)."""
    from dsexport.build.publish import check_output
    from dsexport.calibration.distill_output import REPORT_FILE, REPORT_FORMAT

    check_output(out, overwrite, [model_dir], REPORT_FILE, REPORT_FORMAT, "distill output", inside_protected=False)


def _quant(precision: str, target: str, block_size: int, zero_points: bool, cfg):
    """The QuantSpec `dsexport build --target T --precision P` would use, or None (fp32)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    from dsexport.targets import get_target
    from dsexport.targets.quantization import quant_spec_for

    spec = quant_spec_for(get_target(target), precision, block_size, zero_points=zero_points)
    return spec.for_model(cfg.hidden_size, cfg.moe_intermediate_size) if spec is not None else None


def _pruning(model_dir: Path, reader, calib: list[Path], prune, prune_by, scope, method, profile_path, quant, samples,
             seq_len, progress):
    """The pruning record (or None): from a profile (--plan) or a calibration run on --calib; with
    method merge, which kept expert absorbs each removed one."""
    from dsexport.calibration.pruning import PruneConfig, check_profile_matches, plan_pruning

    if prune is None:
        if profile_path is not None:
            raise UserError("--plan PROFILE needs --prune FRACTION (the share of routed experts to remove)")
        return None
    cfg = reader.config
    prune_config = PruneConfig(prune, prune_by, scope, method)  # checks the fraction, criterion, scope and method
    if profile_path is not None:
        from dsexport.calibration.profile import load_profile
        from dsexport.core.files import sha256_file

        profile = load_profile(profile_path)
        check_profile_matches(profile, cfg, sha256_file(model_dir / "config.json"))
    else:
        from dsexport.calibration.run import calibrate

        profile = calibrate(model_dir, calib, samples, seq_len,
                            progress=lambda stage, done, total: progress(stage, done, total, ""))
    record = plan_pruning(cfg, profile, prune_config, quant).to_record(profile)
    if method == "merge":
        from dsexport.calibration.merging import plan_merges

        record = plan_merges(reader, record, profile)
    return record


def _summary(report: dict) -> str:
    rows = []
    for name, q in report["quality"].items():
        gap = q.get("gap_closed")
        rows.append([name, f"{q['ppl_teacher']:.3f}", f"{q['before']['ppl']:.3f} ({q['before']['ppl_delta']:+.2%})",
                     f"{q['after']['ppl']:.3f} ({q['after']['ppl_delta']:+.2%})",
                     f"{q['before']['kl']:.4f} -> {q['after']['kl']:.4f}", "-" if gap is None else f"{gap:.0%}"])
    table = format_table(["text", "teacher ppl", "before", "after", "KL", "gap closed"], rows, align_right={1, 2, 3})
    return (table + f"\n{report['steps']} steps (best {report['best_step']}) in {report['train_seconds']:.1f} s, "
            f"{report['seconds']:.1f} s in all; peak RSS {human_bytes(report['peak_rss_bytes'])}")


@cli.command()
@click.option("--model", "model_dir", default=None, type=click.Path(path_type=Path),
              help="Checkpoint directory, the teacher (default: the embedded model).")
@click.option("--calib", "calib", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Calibration text: plain text, JSONL with \"text\", or chat JSONL (repeatable; files share --samples).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace a previous distill output at --out.")
@click.option("--prune", type=float, default=None, help="Remove this fraction of routed experts (0..1; docs/pruning.md).")
@click.option("--prune-by", default="output-mass", show_default=True, help="frequency, contribution or output-mass.")
@click.option("--prune-scope", default="global", show_default=True, help="global or per-layer.")
@click.option("--prune-method", default="drop", show_default=True,
              help="drop: removed experts are gone; merge: each is folded into its most router-similar kept expert "
                   "first (docs/pruning.md), and the student starts from the merged weights.")
@click.option("--plan", "profile_path", default=None, type=click.Path(path_type=Path),
              help="A calibration profile (`dsexport calibrate`) to prune by; default: calibrate on --calib now.")
@click.option("--precision", default="fp32", show_default=True,
              help="fp32, or int8/int4: train with the routed experts rounded as `build --precision` will (QAT).")
@click.option("--block-size", default="32", show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Quantization block (as build's).")
@click.option("--zero-points", is_flag=True, help="Asymmetric quantization (as build's).")
@click.option("--target", default="x86-cpu", show_default=True, help="The target whose quantization scheme QAT simulates.")
@click.option("--train", "train_mode", default="moe", show_default=True,
              help="What trains: router, norms (router + RMSNorms), moe (router, kept and shared experts, MoE-layer "
                   "norms) or all (every weight but embedding and head).")
@click.option("--steps", default=None, type=int, help="Optimizer steps (default: --epochs passes over the windows).")
@click.option("--epochs", default=8.0, show_default=True, type=float)
@click.option("--batch", default=16, show_default=True, type=int, help="Windows per step (over all ranks).")
@click.option("--micro-batch", default=8, show_default=True, type=int, help="Windows per forward pass on one rank.")
@click.option("--lr", default=None, type=float, help="Peak learning rate (default: 3e-4 router/norms, 5e-4 moe/all).")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="Softmax temperature of the KL.")
@click.option("--teacher", default="cached", show_default=True,
              help="cached: the teacher's top-k log-probs and rest mass computed once, layer by layer; online: the "
                   "teacher in memory, run every step.")
@click.option("--top-k", default=64, show_default=True, type=int, help="Cached teacher: tokens kept per position.")
@click.option("--hidden-weight", default=0.0, show_default=True, type=float,
              help="Add this x the MoE layers' output mismatch (online teacher).")
@click.option("--bias-update", default=0.0, show_default=True, type=float,
              help="noaux_tc correction bias balancing speed per step (0: frozen).")
@click.option("--holdout", default=0.1, show_default=True, type=float, help="Share of the windows held out.")
@click.option("--eval-every", default=None, type=int, help="Steps between held-out evaluations (default: half an epoch).")
@click.option("--patience", default=3, show_default=True, type=int, help="Evaluations without improvement before stopping.")
@click.option("--samples", default=256, show_default=True, type=int, help="Calibration windows.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per window.")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(path_type=Path),
              help="Further text to report quality on before and after (e.g. another domain; repeatable).")
@click.option("--eval-samples", default=64, show_default=True, type=int, help="Windows per --eval file.")
@click.option("--save-dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="dtype of the tensors distillation changed (the others keep the checkpoint's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="torch threads per process (default: torch's).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, or cuda (under torchrun: the rank's GPU, NCCL); not yet run on a GPU by the test suite.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def distill(model_dir, calib, out_dir, overwrite, prune, prune_by, prune_scope, prune_method, profile_path, precision,
            block_size, zero_points, target, train_mode, steps, epochs, batch, micro_batch, lr, temperature, teacher, top_k,
            hidden_weight, bias_update, holdout, eval_every, patience, samples, seq_len, eval_files, eval_samples,
            save_dtype, seed, threads, device, as_json) -> None:
    """Recover what pruning and quantization cost: distill the original model into the compressed one."""
    require_build_side("distill")
    import torch

    from dsexport import EMBEDDED_MODEL
    from dsexport.calibration.data import load_sequences
    from dsexport.calibration.distill import DistillConfig, distill as run_distill
    from dsexport.calibration.distill_output import write_student
    from dsexport.calibration.profile import model_identity
    from dsexport.exporter.checkpoint import CheckpointReader
    from dsexport.runtime.tokenizer import BundleTokenizer

    model_dir = Path(model_dir or EMBEDDED_MODEL)
    for path in (*calib, *eval_files):
        if not path.is_file():
            raise UserError(f"{'calibration data' if path in calib else '--eval file'} {path} does not exist")
    if samples < 2 or seq_len < 2 or eval_samples < 1:
        raise UserError("--samples and --seq-len must be at least 2, --eval-samples at least 1")
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    quant = _quant(precision, target, int(block_size), zero_points, cfg)
    ranks, device = _ranks(device)
    config = DistillConfig(train=train_mode, steps=steps, epochs=epochs, batch=batch, micro_batch=micro_batch,
                           lr=lr,
                           temperature=temperature, holdout=holdout, eval_every=eval_every, patience=patience,
                           teacher=teacher, top_k=top_k, hidden_weight=hidden_weight, bias_speed=bias_update,
                           seed=seed, quant=quant, device=device)
    _check_out(out_dir, model_dir, overwrite)
    if prune is None and quant is None:
        raise UserError("nothing to recover: pass --prune FRACTION (pruned experts) and/or --precision int4|int8 (QAT)")
    if prune_method != "drop" and prune is None:
        raise UserError("--prune-method merge needs --prune FRACTION")
    progress = DistillProgress(quiet=ranks.rank != 0)
    record = _pruning(model_dir, reader, list(calib), prune, prune_by, prune_scope, prune_method, profile_path, quant,
                      samples, seq_len, progress)
    view = reader
    if record is not None:
        kept = {layer: list(ids) for layer, (ids, _) in record.layers.items()}
        view = reader.with_config(cfg.with_kept_experts(kept)).with_merges(record.merges)
    tokenizer = BundleTokenizer.from_directory(model_dir)
    windows, sources = load_sequences(list(calib), tokenizer, samples, seq_len)
    evals = {str(p): load_sequences([p], tokenizer, eval_samples, seq_len)[0] for p in eval_files}
    result = run_distill(reader, view, windows, config, evals, progress, ranks)
    report = {"teacher": {**model_identity(reader.dir, cfg), "path": str(reader.dir)},
              "pruning": record.to_json() if record is not None else None,
              "data": [vars(s) for s in sources], "ranks": ranks.world, **result.report()}
    if ranks.rank == 0:
        from dsexport.build.publish import publish, staging_directory

        with staging_directory(out_dir) as staging:
            write_student(reader, result.student, staging, report, save_dtype)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # a checkpoint other tools read, not a private temporary
            publish(staging, out_dir)
        click.echo(json.dumps({"out": str(out_dir), **report}, indent=1) if as_json else
                   _summary(report) + f"\nwrote {out_dir}")
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
