"""The `growkit` command line: one typer app; each command lives in the module that owns its work."""

from __future__ import annotations

import sys

import typer

from growkit.errors import GrowkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Grow or shrink trained language-model checkpoints.")
app.command("train")(__import__("growkit.train.cli", fromlist=["train_command"]).train_command)


def main() -> None:
    """Run the CLI; user errors print one line and exit 2, with no traceback."""
    try:
        app()
    except GrowkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
