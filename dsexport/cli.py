"""The `dsexport` command line.

    dsexport build --model ./ckpt --target x86-cpu --out ./dist/mymodel
    dsexport run ./dist/mymodel --prompt "Once upon a time"

Errors in the user's input print one line, `error: ...`, and exit non-zero (codes in
dsexport.errors and docs/cli.md); anything else is a dsexport bug and keeps its traceback.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

from dsexport.errors import UserError


def _progress(stage: str, done: int, total: int) -> None:
    click.echo(f"\r{stage}: layer {done}/{total}", nl=done == total, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsexport")
def cli() -> None:
    """Compile DeepSeek-V2/V3 Mixture-of-Experts checkpoints into ONNX Runtime bundles."""


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer).")
@click.option("--target", default="x86-cpu", show_default=True, help="Device target (see docs/).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--precision", default=None, help="Weight precision (default: the target's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out (only once the new one is complete).")
def build(model_dir: Path, target: str, out_dir: Path, precision: str | None, overwrite: bool) -> None:
    """Export a checkpoint into a bundle for a target."""
    from dsexport.exporter.export import ExportConfig, export_model
    from dsexport.targets import get_target

    tgt = get_target(target)
    precision = precision or tgt.default_precision
    if precision not in tgt.precisions:
        raise UserError(f"precision {precision!r} is not available for {tgt.name}; choose from {', '.join(tgt.precisions)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination and rename at the end: an interrupted build leaves only a
    # hidden .partial directory, never something that looks like a complete bundle.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        result = export_model(model_dir, staging, ExportConfig(moe_lowering=tgt.moe_lowering), progress=_progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {out_dir} ({result.weight_bytes / 2**20:.1f} MiB of weights, target {tgt.name}, "
               f"MoE lowering {tgt.moe_lowering})", err=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the bundle's chat template.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float, help="1 = off.")
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads.")
@click.option("--max-context", default=None, type=int, help="Context limit in tokens (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(bundle: Path, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        repetition_penalty: float, seed: int | None, stop: tuple[str, ...], threads: int | None,
        max_context: int | None, as_json: bool) -> None:
    """Generate text from a bundle."""
    from dsexport.runtime import Engine

    engine = Engine.load(bundle, threads=threads, max_context=max_context)
    if chat:
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
    if as_json:
        result = engine.generate(prompt, **kwargs)
        click.echo(json.dumps({
            "prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": result.text,
            "finish_reason": result.finish_reason, "ttft_s": result.ttft_s,
            "prefill_tokens_per_s": result.prefill_tokens_per_s, "decode_tokens_per_s": result.decode_tokens_per_s,
        }))
        return
    for event in engine.stream(prompt, **kwargs):
        click.echo(event.text, nl=False)
        sys.stdout.flush()
    click.echo()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
