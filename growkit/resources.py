"""Will the output fit? Disk and memory a growth needs, checked against what the machine has before allocating.

A request such as `--width 1000x` is a valid plan that no machine can carry out; without this check it fails hours
(or gigabytes) later with a traceback from the allocator. Figures are estimates from shapes alone: the output's bytes
are exact, the memory peak is a lower bound (one output tensor in fp32, its cast, and its source tensor), so a
refusal is certain to be right and a run that passes may still fail later, as a one-line out-of-memory error.
"""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

from growkit.errors import GrowkitError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; what the messages print."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_disk(path: Path) -> int:
    """Free bytes on the file system that `path` (or its nearest existing ancestor) is on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """What `ulimit -v` (RLIMIT_AS) still allows this process to map, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of free RAM and what `ulimit -v` leaves; None if unknown."""
    known = [n for n in (_meminfo_available(), _address_space_left()) if n is not None]
    return min(known) if known else None


def check_disk(out: Path, need: int, what: str) -> None:
    free = free_disk(out.parent)
    if need > free:
        raise GrowkitError(f"{out}: {what} needs {human_bytes(need)} on disk, but only {human_bytes(free)} is free "
                           "there")


def check_memory(source: str, need: int, what: str) -> None:
    available = available_memory()
    if available is not None and need > available:
        raise GrowkitError(f"{source}: {what} needs at least {human_bytes(need)} of memory, but only "
                           f"{human_bytes(available)} is available")
