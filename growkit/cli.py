"""The `growkit` command line: one typer app; each command lives in the module that owns its work."""

from __future__ import annotations

import sys

import typer

from growkit.errors import GrowkitError
from growkit.hub.push import push_command
from growkit.recipe import run_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Grow or shrink trained language-model checkpoints.")

app.command("push")(push_command)
app.command("run")(run_command)


def main() -> None:
    """Run the CLI; user errors print one line and exit 2, with no traceback."""
    try:
        app()
    except GrowkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
