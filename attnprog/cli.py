"""The `attnprog` command: options in, engine and synth calls out."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from attnprog.errors import AttnProgError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Explain attention heads with executable programs.",
)


def _fail(err: AttnProgError) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# Commands are added below, one function each; keep them thin.


def main() -> None:
    try:
        app()
    except AttnProgError as err:  # pragma: no cover - typer exits before this in normal use
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


_ = Path  # noqa: keep the import for command signatures
