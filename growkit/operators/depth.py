"""Depth maps: which source layer each new layer copies, and which new layers start as exact identities."""

from __future__ import annotations

from growkit.errors import GrowkitError

DEPTH_METHODS = ("stack", "interleave", "identity")
#: Depth methods whose grown model computes exactly what the source did (the others repeat blocks that act again)
EXACT_DEPTH = ("identity",)


def depth_map(method: str | None, old: int, new: int) -> tuple[list[int], set[int]]:
    """`stack` repeats the whole stack, `interleave` repeats each layer in place, `identity` interleaves copies whose
    residual writers are zero, so the grown model computes exactly what the source did. Fewer layers (only reachable
    from `growkit shrink`; the plan refuses them when growing) keep evenly strided layers."""
    if new == old:
        return list(range(old)), set()
    if new < old:  # shrinking with an operator that does not rank blocks itself: evenly strided, the first kept
        return [i * old // new for i in range(new)], set()
    if method == "stack":
        return [i % old for i in range(new)], set()
    src = [i * old // new for i in range(new)]
    if method == "interleave":
        return src, set()
    if method == "identity":
        return src, {i for i in range(1, new) if src[i] == src[i - 1]}
    raise GrowkitError(f"unknown depth method {method!r}; choose one of {', '.join(DEPTH_METHODS)}")
