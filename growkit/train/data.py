"""Real text for tests and benchmarks: the Python standard library's own source, split deterministically.

Why the stdlib: it is on every machine that runs growkit, it is real (not synthetic) text, it is large enough
(~11 MB without tests and site-packages) and it never needs a download. The split is by a hash of each file's
path relative to the stdlib root, so it is identical on every machine with the same Python minor version and
does not depend on file order or on how many files we ask for.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Literal

Split = Literal["train", "val", "all"]

# Directories skipped under the stdlib root: third-party packages, the huge regression-test suites, caches.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"})
VAL_FRACTION_PER_MILLE = 50  # 5% of files go to validation


def stdlib_root() -> Path:
    """The directory holding this interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """'val' or 'train' for a path relative to the stdlib root; stable across runs and machines."""
    digest = hashlib.sha1(relpath.replace(os.sep, "/").encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:4], "big") % 1000 < VAL_FRACTION_PER_MILLE else "train"


def stdlib_files(split: Split = "train", root: Path | None = None) -> list[Path]:
    """Sorted stdlib *.py files of one split ('train', 'val' or 'all')."""
    root = Path(root) if root is not None else stdlib_root()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if split == "all" or split_of(str(path.relative_to(root))) == split:
                out.append(path)
    out.sort(key=lambda p: str(p.relative_to(root)))
    return out


def iter_stdlib_texts(split: Split = "train", max_bytes: int | None = None, root: Path | None = None) -> Iterator[str]:
    """Yield file contents in sorted order, stopping once `max_bytes` (of UTF-8 text) have been yielded."""
    total = 0
    for path in stdlib_files(split, root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are latin-1 test fixtures; skip rather than guess
        if not text.strip():
            continue
        if max_bytes is not None and total + len(text.encode("utf-8")) > max_bytes:
            remaining = max_bytes - total
            if remaining > 0:
                yield text.encode("utf-8")[:remaining].decode("utf-8", errors="ignore")
            return
        total += len(text.encode("utf-8"))
        yield text


def stdlib_text(split: Split = "train", max_bytes: int | None = None, root: Path | None = None) -> str:
    """The split's files joined by a blank line (one string; fine for the ~11 MB stdlib)."""
    return "\n\n".join(iter_stdlib_texts(split, max_bytes, root))


def write_stdlib_corpus(path: Path, split: Split = "train", max_bytes: int | None = None) -> Path:
    """Write the split as one text file, e.g. to feed `growkit train --data`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stdlib_text(split, max_bytes), encoding="utf-8")
    return path
