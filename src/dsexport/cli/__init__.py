"""The `dsexport` command line (docs/cli.md).

    dsexport build --model ./ckpt --target x86-cpu --out ./dist/mymodel
    dsexport plan --model ./ckpt --target jetson-orin-nano-8gb --precision int4 [--json]
    dsexport run ./dist/mymodel --prompt "Once upon a time"
    dsexport inspect ./dist/mymodel [--json]

Build-side commands: dsexport/cli/build_commands.py; device-side commands (no torch needed):
dsexport/cli/device_commands.py.
"""

from __future__ import annotations

import sys

import click

from dsexport.core.errors import UserError

from . import build_commands, device_commands, distill_command, serve_command  # noqa: F401  (each registers its commands)
from .app import ValidationFailed, cli

__all__ = ["cli", "main"]


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except ValidationFailed:
        sys.exit(1)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
