"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class GrowkitError(Exception):
    """A problem with the user's input or environment, described in one line that names the file and the problem."""


class Interrupted(GrowkitError):
    """SIGINT or SIGTERM stopped a run; whatever it had half-written has been removed. The CLI exits 130."""

    exit_code = 130


#: How running out of memory (RAM, or the `ulimit -v` address space) reaches Python besides MemoryError: torch's
#: allocator and safetensors' mmap raise RuntimeError, the dynamic loader fails an import with ImportError.
_NO_MEMORY = ("Cannot allocate memory", "can't allocate memory", "not enough memory", "failed to map segment")


def out_of_memory(exc: BaseException) -> bool:
    """True when `exc` means the process ran out of memory, whichever library noticed."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, (RuntimeError, OSError, ImportError)) and any(s in str(exc) for s in _NO_MEMORY))


def out_of_memory_line(exc: BaseException) -> str:
    """The one line the CLI prints for it: what ran out, and the library's own first line (which says how much)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[0][:240] if lines else type(exc).__name__
    return f"out of memory (RAM, or the address-space limit of ulimit -v): {detail}"
