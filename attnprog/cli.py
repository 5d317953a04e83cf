"""The `attnprog` command: options in, engine and synth calls out."""

from __future__ import annotations

import sys
import typer

from attnprog.errors import AttnProgError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Explain attention heads with executable programs.",
)


# Commands are added below, one function each; keep them thin.


def main() -> None:
    """Console entry point: a user error prints one line, no traceback, and exits 2."""
    try:
        app()
    except AttnProgError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
