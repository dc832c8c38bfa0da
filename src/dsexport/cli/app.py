"""The `dsexport` command group, progress display and what every command shares.

Errors in the user's input print one line, `error: ...`, and exit non-zero (codes in
docs/cli.md); anything else is a dsexport bug and keeps its traceback. Nothing here imports
torch or onnx: the device-side commands run on a runtime-only install.
"""

from __future__ import annotations

import sys
import time

import click

from dsexport.core.errors import UserError


class ValidationFailed(Exception):
    """The bundle ran but no longer is the model (validate), or a node fails a check: exit code 1."""


class Progress:
    """Stage progress on stderr: a live line on a terminal, one line per stage otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        text = f"{stage}: {done}/{total}" + (" layers" if stage == "export" else "") + f"  [{elapsed:6.1f} s]"
        if self.tty:
            click.echo("\r" + text + " " * 8, nl=done >= total, err=True)
        elif done >= total:
            click.echo(text, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsexport")
def cli() -> None:
    """Compile DeepSeek-V2/V3 Mixture-of-Experts checkpoints into ONNX Runtime and TensorRT bundles."""


def resolve_target(name: str) -> str:
    from dsexport.targets import resolve_target_name

    resolved, note = resolve_target_name(name)
    if note:
        click.echo(note, err=True)
    return resolved


def require_build_side(command: str) -> None:
    """One line naming the extra when torch or onnx is missing (a runtime-only install)."""
    missing = []
    for module in ("torch", "onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"`dsexport {command}` needs {' and '.join(missing)}, which a runtime-only install lacks: "
                        "pip install \"dsexport[export]\" (with the CPU torch: pip install torch==2.13.0 first)")
