"""The `growkit` command line: one typer app; each command lives in the module that owns its work."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import typer

from growkit.errors import GrowkitError
from growkit.grow_command import grow_command
from growkit.hub.push import push_command
from growkit.measure.command import inspect_command
from growkit.recipe import run_command
from growkit.train.cli import train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Grow or shrink trained language-model checkpoints.")
app.command("grow")(grow_command)
app.command("push")(push_command)
app.command("run")(run_command)
app.command("train")(train_command)
app.command("inspect")(inspect_command)


@app.callback()
def _root() -> None:
    """growkit: transfer a trained checkpoint's weights into a model of another size, zero-shot."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so half-written output is removed on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    """Run the CLI; user errors print one line and exit 2, with no traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' advice on configs we did not write is noise here
    if "--quiet" in sys.argv or "-q" in sys.argv:
        hf_logging.disable_progress_bar()
    try:
        app()
    except GrowkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing was written at the output path", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
