"""The `growkit` command line: one typer app; each command lives in the module that owns its work."""

from __future__ import annotations

import os
import sys

from growkit import interrupts

if __name__ == "__main__":  # `python -m growkit.cli`; the `growkit` script does this in growkit/__main__.py
    # First, before any heavy import: a Ctrl-C during start-up is recorded, never swallowed by an import (see
    # growkit.interrupts), and acted on as soon as the command starts.
    interrupts.install()
    interrupts.pause_point("start-up")

# Transparent huge pages for torch's large CPU allocations; torch reads this once, so it is set before torch is first
# imported (just below). Growth allocates every output tensor afresh, and faulting in fresh memory 4 KiB at a time
# was a large part of its CPU time (benchmarks/bench_scale.py, medians of 3: GPT-2 small -> medium 9.4 -> 7.2 s,
# Llama 1.2 GB 2x 27.7 -> 21.7 s; page faults 1.45M -> 0.12M). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _memory_excepthook(kind: type[BaseException], exc: BaseException, tb: object) -> None:
    """Under a small `ulimit -v` the imports just below fail (torch's shared library cannot be mapped) before main()
    can catch anything: say so in one line and exit 2, like any other failure for lack of resources."""
    from growkit.errors import out_of_memory, out_of_memory_line

    if not out_of_memory(exc):
        sys.__excepthook__(kind, exc, tb)  # type: ignore[arg-type]
        return
    sys.stderr.write(f"error: {out_of_memory_line(exc)}\n")
    sys.stderr.flush()
    os._exit(2)


_previous_excepthook, sys.excepthook = sys.excepthook, _memory_excepthook

import typer  # noqa: E402

from growkit.errors import GrowkitError, out_of_memory, out_of_memory_line  # noqa: E402
from growkit.grow_command import grow_command  # noqa: E402
from growkit.hub.push import push_command  # noqa: E402
from growkit.measure.command import inspect_command  # noqa: E402
from growkit.recipe import run_command  # noqa: E402
from growkit.shrink_command import shrink_command  # noqa: E402
from growkit.train.cli import train_command  # noqa: E402
from growkit.upcycle_command import upcycle_command  # noqa: E402

sys.excepthook = _previous_excepthook  # the imports are done: a program importing growkit.cli keeps its own hook

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Grow or shrink trained language-model checkpoints.")
app.command("grow")(grow_command)
app.command("push")(push_command)
app.command("run")(run_command)
app.command("train")(train_command)
app.command("inspect")(inspect_command)
app.command("shrink")(shrink_command)
app.command("upcycle")(upcycle_command)


@app.callback()
def _root() -> None:
    """growkit: transfer a trained checkpoint's weights into a model of another size, zero-shot."""


def _quiet_transformers(quiet: bool) -> None:
    """transformers' advice on configs we did not write is noise here. Said through the environment when transformers
    is not imported yet, which spares every run (most never need transformers) half a second of importing it."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main() -> None:
    """Run the CLI; user errors print one line and exit 2, with no traceback.

    SIGINT and SIGTERM unwind like Ctrl-C (half-written output is removed on the way out) and exit 130. One that
    arrives after the command's output was published changes nothing: the run finishes, says so, and exits 0.
    """
    interrupts.install()
    _quiet_transformers("--quiet" in sys.argv or "-q" in sys.argv)
    try:
        interrupts.arm()
    except KeyboardInterrupt as exc:
        typer.echo(f"error: interrupted by {exc} during start-up; nothing was written", err=True)
        sys.exit(130)
    try:
        app()
    except GrowkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except SystemExit as exc:  # click ends every command with one, 0 when it succeeded
        if exc.code in (0, None) and interrupts.pending() is not None:
            typer.echo(f"growkit: note: {interrupts.pending()} arrived after the work was complete; finished "
                       "normally", err=True)
        if exc.code == 130:  # click turned a KeyboardInterrupt that no command caught into a bare exit 130
            typer.echo(f"error: interrupted by {interrupts.pending() or 'SIGINT'}; the command did not finish",
                       err=True)
        raise
    except (MemoryError, RuntimeError, OSError) as exc:
        if not out_of_memory(exc):
            raise
        typer.echo(f"error: {out_of_memory_line(exc)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
