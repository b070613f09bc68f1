"""Streamed, atomic checkpoint writing.

Every output tensor's name, shape and dtype are known before any weight is computed, so each shard's safetensors
header is written first and tensors are appended one at a time as they are produced: peak memory stays near one
output tensor. (The safetensors library only serialises whole dicts, which would hold a whole shard in memory; the
format itself is an 8-byte header length, a JSON header with byte offsets, then the raw little-endian bytes.)

Everything is written into a hidden temporary directory beside the target and renamed into place at the end, so a
crash never leaves a directory at the output path that looks complete.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not on Windows: ownership falls back to the pid in the name
    fcntl = None  # type: ignore[assignment]

import torch

from growkit import interrupts
from growkit.checkpoint.outputs import replaceable_problem
from growkit.checkpoint.reader import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from growkit.errors import GrowkitError

TMP_PREFIX = ".growkit-tmp-"
#: Smaller limits are typos (a size without its unit: `--max-shard-size 5`) and give every tensor a file of its own.
MIN_SHARD_SIZE = 10_000

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def parse_size(text: str | int) -> int:
    """'5GB' (decimal, as Hugging Face uses), '500MiB' (binary) or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise GrowkitError(f"--max-shard-size: expected a size like 5GB or 500MiB, got {text!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    size = int(float(m.group(1)) * base**power)
    if size < MIN_SHARD_SIZE:
        raise GrowkitError(f"--max-shard-size: {text!r} is {size} bytes, below the minimum of {MIN_SHARD_SIZE // 1000}KB "
                           "(a unit missing? e.g. 5GB or 500MiB)")
    return size


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def shard_layout(entries: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Split tensors, in order, into shards no larger than `max_shard_size` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


class CheckpointWriter:
    """Writes a checkpoint directory atomically: `add` tensors in layout order, `add_file`, then `commit`.

    The temporary directory's name says whose it is (`.growkit-tmp-OUT-hHOST-pPID-TAG`), and the writer holds an
    exclusive `flock` on it while it lives, so a later run can tell a crashed run's leftovers (removed) from a
    running one's (left alone). Every I/O failure becomes a one-line GrowkitError that names the output and the cause
    (disk full, read-only file system, ...), and everything written so far is removed.
    """

    def __init__(self, out: Path, entries: list[TensorEntry], max_shard_size: int, metadata: dict[str, str],
                 overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise GrowkitError(f"{self.out}: output already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise GrowkitError(f"{self.out}: output exists and is not a directory")
        parent = self.out.parent
        self._made_parents = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrowkitError(f"{parent}: cannot create the output's parent directory ({_why(exc)})") from None
        if not os.access(parent, os.W_OK):
            self._remove_made_parents()
            raise GrowkitError(f"{parent}: output directory is not writable")
        self.overwrite = overwrite
        self.tmp = parent / temporary_name(self.out.name)
        self.shards = shard_layout(entries, max_shard_size)
        n = len(self.shards)
        self.files = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._metadata = metadata
        self._order = [e for shard in self.shards for e in shard]
        self._next = 0
        self._shard = -1
        self._in_shard = 0
        self._fh: BinaryIO | None = None
        self._shard_size = 0
        self._lock: int | None = None
        self.committed = False
        try:
            self.tmp.mkdir()
        except OSError as exc:
            self._remove_made_parents()
            raise GrowkitError(f"{parent}: cannot create a temporary directory for {self.out.name} "
                               f"({_why(exc)})") from None
        self._lock = _lock_directory(self.tmp)
        with self.guard(".incomplete"):
            (self.tmp / ".incomplete").write_text("growkit: this directory is being written\n")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None:
            return False
        if self.committed:
            # An interrupt deferred while the final rename was under way arrives here: the checkpoint is complete.
            return exc_type is KeyboardInterrupt
        self.abort()
        return False

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn an OSError while writing `what` into a one-line GrowkitError naming the output and the cause."""
        try:
            yield
        except OSError as exc:
            raise GrowkitError(f"{self.out}: {_why(exc)} while writing {what}; nothing was written "
                               "(partial files removed)") from None

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._shard += 1
        name = self.files[self._shard]
        header = _header(self.shards[self._shard], self._metadata)
        self._shard_size = len(header) + sum(e.nbytes for e in self.shards[self._shard])
        with self.guard(name):
            self._fh = open(self.tmp / name, "wb")
            self._fh.write(header)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._fh is not None:
            if self._fh.tell() != self._shard_size:
                raise RuntimeError(f"{self._fh.name}: wrote {self._fh.tell()} bytes of {self._shard_size}")
            with self.guard(Path(self._fh.name).name):
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
            self._fh = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must come in layout order with the announced shape and dtype."""
        expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._fh is None or self._in_shard == len(self.shards[self._shard]):
            self._open_next_shard()
        assert self._fh is not None
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        with self.guard(self.files[self._shard]):
            self._fh.write(memoryview(data))
        self._next += 1
        self._in_shard += 1

    def add_file(self, name: str, data: bytes | str) -> None:
        with self.guard(name):
            (self.tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        with self.guard(name or src.name):
            shutil.copyfile(src, self.tmp / (name or src.name))

    def finish_weights(self) -> None:
        """Close the last shard and write the index, so the temporary directory loads (e.g. to verify it)."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if self._fh is None and (self.tmp / self.files[-1]).exists():
            return
        self._close_shard()
        if len(self.files) > 1:
            weight_map = {e.name: f for f, shard in zip(self.files, self.shards) for e in shard}
            total = sum(e.nbytes for e in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            self.add_file(WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")

    def commit(self) -> Path:
        """Finish the weights and move the directory into place in one rename.

        SIGINT and SIGTERM are held back for the few system calls of the swap, so an interrupt leaves either no
        output (or the previous one) or the complete new one; `kill -9` cannot be held back, and the rename is what
        keeps it from leaving a partial directory at the output path. An interrupt that arrived earlier but was
        swallowed on the way (growkit.interrupts) stops the run here, before anything is replaced.
        """
        self.finish_weights()
        with self.guard("the directory"):
            (self.tmp / ".incomplete").unlink()
            _fsync_dir(self.tmp)
        with signals_held():
            interrupts.raise_if_pending()
            with self.guard("the directory"):
                publish_directory(self.tmp, self.out, self.overwrite)
            self.committed = True
            interrupts.published()
        self._unlock()
        interrupts.pause_point("published")
        return self.out

    def abort(self) -> None:
        """Remove everything written so far (and any parent directories this writer made); never touches `out`."""
        if self._fh is not None:
            try:
                self._fh.close()  # flushing can fail again (disk full): the file is being removed anyway
            except OSError:
                pass
            self._fh = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()
        self._remove_made_parents()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _remove_made_parents(self) -> None:
        for p in self._made_parents:  # deepest first; only directories this writer created, and only if empty
            try:
                p.rmdir()
            except OSError:
                break


def publish_directory(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete directory `tmp` to `out`. With `overwrite`, an existing `out` is swapped out atomically
    where the OS can (Linux renameat2, else two renames) and then removed, and stderr says so; but only if it is
    still a directory that --overwrite may replace (growkit.checkpoint.outputs), checked again at this moment."""
    if overwrite and (out.exists() or out.is_symlink()):
        problem = replaceable_problem(out)
        if problem is not None:
            raise GrowkitError(f"{out}: --overwrite refused: {problem}; remove it yourself or choose another output")
        if _rename2(tmp, out, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        else:
            old = tmp.with_name(tmp.name + "-old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        print(f"growkit: replaced the previous {out} (--overwrite)", file=sys.stderr)
    elif not _rename2(tmp, out, _RENAME_NOREPLACE):
        if out.exists() or out.is_symlink():  # where the OS cannot refuse atomically, check just before
            raise FileExistsError(errno.EEXIST, "exists", str(out))
        os.rename(tmp, out)
    try:
        _fsync_dir(out.parent)
    except OSError as exc:
        print(f"growkit: warning: {out} is complete, but syncing its parent directory failed ({_why(exc)})",
              file=sys.stderr)


def publish_files(tmp: Path, directory: Path) -> None:
    """Move the files of the complete directory `tmp` into the existing `directory` (a training run's, which also
    holds metrics and checkpoints, so it cannot be swapped whole), config.json last: until it lands, the directory
    does not look like a finished model. Files get the mode a new file gets (0644 under the usual umask), as the
    writer's do; signals are held for the renames, and a swallowed interrupt stops the run before the first."""
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(tmp.iterdir(), key=lambda f: (f.name == "config.json", f.name))
    for f in files:
        os.chmod(f, 0o666 & ~umask)
    _fsync_dir(tmp)
    with signals_held():
        interrupts.raise_if_pending()
        for f in files:
            os.replace(f, directory / f.name)
        interrupts.published()
    tmp.rmdir()
    _fsync_dir(directory)


def _why(exc: OSError) -> str:
    """The cause of an I/O error in the words a user searches for."""
    known = {errno.ENOSPC: "disk full (no space left on device)", errno.EDQUOT: "disk quota exceeded",
             errno.EEXIST: "the output appeared meanwhile (another run?) and was not replaced",
             errno.ENOTEMPTY: "the output appeared meanwhile (another run?) and was not replaced",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EFBIG: "file too large for this file system or the file-size limit (ulimit -f)"}
    return known.get(exc.errno or 0, exc.strerror or str(exc))


@contextmanager
def signals_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM (delivered on exit from the block) where the platform allows."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2: RENAME_NOREPLACE fails if `b` exists (two runs racing for one output cannot clobber each
    other), RENAME_EXCHANGE swaps two existing paths in one step. False where the OS or file system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    return _rename2(a, b, _RENAME_EXCHANGE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- temporary directories: naming, ownership, and what a later run does with a crashed run's leftovers ---------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


#: Longest output name kept whole in a temporary name, so that `.growkit-tmp-NAME-hHOST-pPID-TAG-old` stays within
#: the 255 bytes a file name may have (NAME_MAX) for any output name that is itself valid.
_STEM_MAX = 120


def name_stem(out_name: str) -> str:
    """The output's name as it appears in its temporary names: whole, or cut and tagged with a hash of the whole."""
    if len(os.fsencode(out_name)) <= _STEM_MAX:
        return out_name
    stem = out_name
    while len(os.fsencode(stem)) > _STEM_MAX - 9:
        stem = stem[:-1]
    return f"{stem}~{hashlib.sha1(os.fsencode(out_name)).hexdigest()[:8]}"


def temporary_name(out_name: str) -> str:
    """`.growkit-tmp-OUT-hHOST-pPID-TAG`: recognisable by prefix, and it says which process on which host owns it."""
    return f"{TMP_PREFIX}{name_stem(out_name)}-h{_host()}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _lock_directory(path: Path) -> int | None:
    """Hold an exclusive flock on the directory for this process's lifetime (the kernel drops it when we die)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no flock on this file system (some network mounts): fall back to the pid alone
        pass
    return fd


def _locked_by_someone(path: Path) -> bool:
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class Temporary:
    """A growkit temporary directory beside an output, and what is known about its owner."""

    path: Path
    host: str | None
    pid: int | None
    state: str  # "stale" (owner gone: safe to remove), "running", "other host" (cannot tell: reported only)

    def describe(self) -> str:
        if self.state == "running":
            return f"{self.path} belongs to a growkit run still in progress (pid {self.pid}); left alone"
        if self.state == "other host":
            return (f"{self.path} was left by a run on host {self.host} (pid {self.pid}); remove it by hand if that "
                    "run is over")
        return f"{self.path} was left by an interrupted run (pid {self.pid})"


def _temporary_pattern(out_name: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(TMP_PREFIX + name_stem(out_name))}-(?:h(?P<host>[A-Za-z0-9_]+)-p)?(?P<pid>\d+)-"
                      r"[0-9a-f]{8}(?:-old)?")


def scan_temporaries(out: Path) -> list[Temporary]:
    """Every growkit temporary directory of `out` beside it, classified by whether its owner is still alive.

    Stale means: written on this host, by a process that no longer exists, and nobody holds its lock. A live pid
    (possibly reused) or a held lock means running; a directory from another host is only reported, since its
    owner cannot be checked from here (shared file systems).
    """
    out = Path(out)
    pattern = _temporary_pattern(out.name)
    found: list[Temporary] = []
    try:
        candidates = [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX + name_stem(out.name) + "-")]
    except OSError:
        return []
    for path in sorted(candidates):
        m = pattern.fullmatch(path.name)
        if not m or not path.is_dir():
            continue
        host, pid = m.group("host"), int(m.group("pid"))
        if host is not None and host != _host():
            state = "other host"
        elif _pid_alive(pid) or _locked_by_someone(path):
            state = "running"
        else:
            state = "stale"
        found.append(Temporary(path, host, pid, state))
    return found


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
