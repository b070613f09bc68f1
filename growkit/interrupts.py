"""SIGINT/SIGTERM for the command line: never swallowed, never acted on after the output is complete.

Why not Python's default handler: it raises KeyboardInterrupt wherever the main thread happens to be, and a library
that catches too broadly (a bare `except:` around an optional import, which torch's start-up has) swallows it; the
run then finishes and, with --overwrite, replaces the previous output although the user pressed Ctrl-C. And after
the output has been renamed into place, an interrupt that unwinds the rest of the run makes the CLI say "not
written" about an output that was written.

So the CLI installs `install()` before its heavy imports, and a signal is always *recorded* (`pending()`), whatever
the code it lands in does with the exception. The handler has three modes:

- deferred (start-up, and after an output was published): record only. `arm()` raises the recorded signal once the
  next piece of interruptible work starts; the CLI's `main` reports one that arrived after the last output was
  published as a note and still exits 0, because that output is complete.
- armed (while work runs): record and raise KeyboardInterrupt at once.
- publishing code checks `raise_if_pending()` just before its rename, so a swallowed interrupt stops it there.

Outside the CLI (library use) nothing is installed and every function here is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

_installed = False
_armed = False
_received: str | None = None

#: Test hook: "NAME:FILE" makes `pause_point(NAME)` create FILE (FILE.rank<N> in each process of a multi-process
#: run) holding its pid and wait there until FILE is removed or a signal arrives, so tests can send a signal at an
#: exact point instead of guessing with sleeps.
PAUSE_ENV = "GROWKIT_TEST_PAUSE"


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    name = signal.Signals(signum).name
    _received = _received or name
    if _armed:
        raise KeyboardInterrupt(name)


def install() -> None:
    """Take over SIGINT and SIGTERM in deferred mode (signals are recorded, not raised) until `arm()`."""
    global _installed, _armed
    _installed, _armed = True, False
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def installed() -> bool:
    """Whether the CLI's handlers are in charge (library use: they are not, and a signal is the caller's)."""
    return _installed


def defer() -> None:
    """From here on a signal is recorded, not raised, until `arm()`: for work that must reach a safe point first (a
    multi-process training step, whose collectives would leave the other processes waiting for this one)."""
    global _armed
    _armed = False


def pending() -> str | None:
    """The first signal received ("SIGINT", "SIGTERM"), if any; a received signal stays pending: the run stops."""
    return _received


def arm() -> None:
    """Interruptible work starts: a signal recorded meanwhile is raised now, later ones at once."""
    global _armed
    if not _installed:
        return
    _armed = True
    raise_if_pending()


def raise_if_pending() -> None:
    """Raise KeyboardInterrupt(signal name) if a signal has arrived, even one that something swallowed."""
    if _installed and _received is not None:
        raise KeyboardInterrupt(_received)


def published() -> None:
    """An output is complete and in place: from here on a signal is recorded, not raised (see `arm`)."""
    global _armed
    _armed = False


def pause_point(name: str) -> None:
    """Wait here when the test hook names this point (see PAUSE_ENV); a no-op otherwise."""
    spec = os.environ.get(PAUSE_ENV, "")
    point, _, marker = spec.partition(":")
    if point != name or not marker:
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun: one marker per process, FILE.rank<N>
        marker = f"{marker}.rank{os.environ.get('RANK', '0')}"
    flag = Path(marker)
    flag.write_text(f"{os.getpid()}\n")
    while flag.exists() and pending() is None:
        time.sleep(0.01)
