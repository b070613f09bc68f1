"""Streamed, atomic checkpoint writing.

Every output tensor's name, shape and dtype are known before any weight is computed, so each shard's safetensors
header is written first and tensors are appended one at a time as they are produced: peak memory stays near one
output tensor. (The safetensors library only serialises whole dicts, which would hold a whole shard in memory; the
format itself is an 8-byte header length, a JSON header with byte offsets, then the raw little-endian bytes.)

Everything is written into a hidden temporary directory beside the target and renamed into place at the end, so a
crash never leaves a directory at the output path that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from growkit.checkpoint.reader import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from growkit.errors import GrowkitError

TMP_PREFIX = ".growkit-tmp-"

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
    return int(float(m.group(1)) * base**power)


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
    """Writes a checkpoint directory atomically: `add` tensors in layout order, `add_file`, then `commit`."""

    def __init__(self, out: Path, entries: list[TensorEntry], max_shard_size: int, metadata: dict[str, str],
                 overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise GrowkitError(f"{self.out}: output already exists (pass --overwrite to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise GrowkitError(f"{self.out}: output exists and is not a directory")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GrowkitError(f"{parent}: cannot create the output's parent directory ({exc.strerror})") from None
        if not os.access(parent, os.W_OK):
            raise GrowkitError(f"{parent}: output directory is not writable")
        self.overwrite = overwrite
        self.tmp = parent / f"{TMP_PREFIX}{self.out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.shards = shard_layout(entries, max_shard_size)
        n = len(self.shards)
        self.files = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._metadata = metadata
        self._order = [e for shard in self.shards for e in shard]
        self._next = 0
        self._shard = -1
        self._in_shard = 0
        self._fh: BinaryIO | None = None
        self.tmp.mkdir()
        (self.tmp / ".incomplete").write_text("growkit: this directory is being written\n")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()

    def _open_next_shard(self) -> None:
        self._close_shard()
        self._shard += 1
        self._fh = open(self.tmp / self.files[self._shard], "wb")
        self._fh.write(_header(self.shards[self._shard], self._metadata))
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._fh is not None:
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
        try:
            self._fh.write(memoryview(data))
        except OSError as exc:
            raise GrowkitError(f"{self.tmp / self.files[self._shard]}: write failed ({exc.strerror or exc})") from None
        self._next += 1
        self._in_shard += 1

    def add_file(self, name: str, data: bytes | str) -> None:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    def copy_file(self, src: Path, name: str | None = None) -> None:
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
        """Finish the weights and move the directory into place in one rename."""
        self.finish_weights()
        (self.tmp / ".incomplete").unlink()
        _fsync_dir(self.tmp)
        if self.out.exists():
            trash = self.out.parent / f"{TMP_PREFIX}{self.out.name}-replaced-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, trash)
            os.rename(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        """Remove everything written so far; the output path is never touched."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stale_temporaries(out: Path) -> list[Path]:
    """Temporary directories a crashed run left beside `out` (their writer process is gone)."""
    found = []
    for path in Path(out).parent.glob(f"{TMP_PREFIX}{Path(out).name}-*"):
        m = re.search(r"-(\d+)-[0-9a-f]{8}$", path.name)
        if m and _pid_alive(int(m.group(1))):
            continue
        found.append(path)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
