"""Running the real `growkit` CLI in subprocesses, and the checks every failed run must pass."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from growkit.interrupts import PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _child_setup() -> None:
    # A child of a shell's background job may start with SIGINT ignored, and Python then never turns SIGINT into
    # KeyboardInterrupt; these tests send SIGINT on purpose, so they restore the default first.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "growkit.cli", *map(str, args)]


def run_cli(*args: str | Path, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=REPO, **kw)


_FORK_DRIVER = r"""
import json, os, sys, tempfile, traceback
import growkit.cli
from transformers import AutoConfig  # every run checks its configs with it: imported once, not once per child

jobs, width = json.loads(sys.stdin.read()), int(sys.argv[1])
results, running, queue = {}, {}, list(enumerate(jobs))
workdir = tempfile.mkdtemp(prefix="growkit-cli-batch-")
while queue or running:
    while queue and len(running) < width:
        i, argv = queue.pop(0)
        out, err = (os.path.join(workdir, f"{i}.{k}") for k in ("out", "err"))
        pid = os.fork()
        if pid == 0:  # the child: exactly what `python -m growkit.cli ARGV` does after its imports
            fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT), os.open(err, os.O_WRONLY | os.O_CREAT)
            os.dup2(fo, 1), os.dup2(fe, 2)
            sys.argv = ["growkit", *argv]
            code = 0
            try:
                growkit.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        running[pid] = (i, out, err)
    pid, status = os.wait()
    i, out, err = running.pop(pid)
    results[i] = [os.waitstatus_to_exitcode(status), open(out).read(), open(err).read()]
import shutil
shutil.rmtree(workdir, ignore_errors=True)
print(json.dumps([results[i] for i in range(len(jobs))]))
"""


def run_cli_batch(jobs: list[list[str | Path]], width: int = 3, timeout: float = 600
                  ) -> list[subprocess.CompletedProcess[str]]:
    """Run many CLI invocations, each in its own process, without paying torch's import for each.

    One interpreter imports `growkit.cli` once and forks a child per invocation; the child sets `sys.argv` and
    calls `growkit.cli.main()`, so each case still has its own process, exit status, stdout and stderr (an uncaught
    exception prints its traceback and exits 1, as the interpreter would). Up to `width` children run at a time.
    """
    argvs = [[str(a) for a in job] for job in jobs]
    proc = subprocess.run([sys.executable, "-c", _FORK_DRIVER, str(width)], input=json.dumps(argvs),
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess(["growkit", *argv], rc, out, err) for argv, (rc, out, err) in zip(argvs, rows)]


def start_cli(*args: str | Path, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO, preexec_fn=_child_setup, **kw)


def error_line(returncode: int, stderr: str, *fragments: str | Path) -> str:
    """The run failed with one `error: ...` line that names every fragment, and nothing else on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert str(fragment) in line, f"{fragment!s} not in: {line}"
    return line


def assert_nothing_written(out: Path, before: dict[str, bytes] | None = None) -> None:
    """No output directory (or the previous one, byte for byte) and no temporary directory beside it."""
    if before is None:
        assert not out.exists(), f"{out} was written"
    else:
        assert snapshot(out) == before, f"{out} was changed"
    leftovers = sorted(p.name for p in out.parent.glob(".growkit-tmp-*"))
    assert not leftovers, leftovers


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- editing safetensors files byte by byte -------------------------------------------------------------------

def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def start_paused(point: str, marker: Path, *args: str | Path, cwd: Path = REPO) -> subprocess.Popen[str]:
    """Start `growkit ARGS`, which will wait at `point` (growkit.interrupts.pause_point); returns once it is there
    (the marker exists), so a test can send a signal at that exact point instead of at a guessed moment."""
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**{PAUSE_ENV: f"{point}:{marker}", "OMP_NUM_THREADS": "1"}), cwd=cwd,
                            preexec_fn=_child_setup)
    deadline = time.monotonic() + 600  # generous: only a run that never gets there waits this long
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never reached {point}: {proc.communicate()}")
        time.sleep(0.02)
    return proc


def free_port() -> int:
    """A port nobody listens on now, so two suites on one machine do not collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, *args: str | Path) -> list[str]:
    """`torchrun --nproc_per_node N -m growkit.cli ARGS` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "growkit.cli", *map(str, args)]


def start_torchrun_paused(point: str, marker: Path, nproc: int, *args: str | Path
                          ) -> tuple[subprocess.Popen[str], dict[int, int]]:
    """`torchrun --nproc_per_node N -m growkit.cli ARGS` whose every process waits at `point`; returns once all are
    there, with each rank's pid. A rank goes on once its marker (MARKER.rank<N>) is removed, or it gets a signal."""
    proc = subprocess.Popen(torchrun_command(nproc, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=cli_env(**{PAUSE_ENV: f"{point}:{marker}", "OMP_NUM_THREADS": "1"}),
                            preexec_fn=_child_setup)
    markers = {rank: Path(f"{marker}.rank{rank}") for rank in range(nproc)}
    deadline = time.monotonic() + 600  # generous: only a run that never gets there waits this long
    while not all(m.exists() and m.read_text().strip() for m in markers.values()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never reached {point}: {proc.communicate()}")
        time.sleep(0.02)
    return proc, {rank: int(m.read_text()) for rank, m in markers.items()}
