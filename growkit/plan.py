"""A user's request (`--width 2x`, `--hidden 1024 --heads 16`, `--layers 24`) -> validated target sizes.

Everything that can be wrong with a request is caught here, before a single tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from growkit.arch.spec import Family, Sizes
from growkit.arch.validate import as_options, nearest_passing, target_problem
from growkit.errors import GrowkitError

Direction = Literal["grow", "shrink"]


@dataclass(frozen=True)
class GrowthPlan:
    """Source and target sizes of one growth (or shrink) and how depth changes."""

    family: str
    source: Sizes
    target: Sizes
    method: str
    depth_method: str | None
    direction: Direction

    def rows(self) -> list[tuple[str, int, int]]:
        """(axis, old, new) for every size, for tables and provenance."""
        old, new = self.source.as_dict(), self.target.as_dict()
        return [(k, old[k], new[k]) for k in old]


def parse_factor(text: str | float | int, what: str) -> Fraction:
    """'2x', '2', '1.5x', '0.5x' or a number -> an exact fraction."""
    if isinstance(text, (int, float)):
        value = Fraction(text).limit_denominator(1000)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\d+/\d+)\s*[xX]?\s*", text)
        if not m:
            raise GrowkitError(f"--{what}: expected a factor like 2x or 1.5x, got {text!r}")
        value = Fraction(m.group(1))
    if value <= 0:
        raise GrowkitError(f"--{what}: factor must be positive, got {text!r}")
    return value


def _scaled(old: int, factor: Fraction, axis: str) -> int:
    new = old * factor
    if new.denominator != 1:
        raise GrowkitError(f"--width {float(factor):g}x gives {axis} {float(new):g}, not a whole number")
    return int(new)


def _layers(old: int, layers: str | int | None) -> int:
    if layers is None:
        return old
    if isinstance(layers, int) or str(layers).strip().isdigit():
        return int(layers)
    new = old * parse_factor(layers, "layers")
    if new.denominator != 1:
        raise GrowkitError(f"--layers {layers} gives {float(new):g} layers, not a whole number")
    return int(new)


def make_plan(family: Family, source: Sizes, *, width: str | float | None = None, hidden: int | None = None,
              ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
              layers: str | int | None = None, method: str = "clone", depth_method: str | None = "stack",
              direction: Direction = "grow") -> GrowthPlan:
    """Target sizes for a request: `width` scales hidden, ffn, heads and kv heads together; explicit sizes win."""
    target = source
    if width is not None:
        f = parse_factor(width, "width")
        target = target.replace(hidden=_scaled(source.hidden, f, "hidden"), ffn=_scaled(source.ffn, f, "ffn"),
                                heads=_scaled(source.heads, f, "heads"), kv_heads=_scaled(source.kv_heads, f, "kv_heads"))
    explicit = {k: v for k, v in dict(hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads).items() if v is not None}
    for key, value in explicit.items():
        if int(value) <= 0:
            raise GrowkitError(f"--{key.replace('_', '-')} must be positive, got {value}")
    target = target.replace(**{k: int(v) for k, v in explicit.items()}, layers=_layers(source.layers, layers))
    if source.kv_heads == source.heads and kv_heads is None and heads is not None:
        target = target.replace(kv_heads=target.heads)  # plain multi-head attention stays multi-head
    if target.layers <= 0:
        raise GrowkitError(f"--layers must be positive, got {target.layers}")

    if target.heads % target.kv_heads:
        raise GrowkitError(f"heads {target.heads} must be a multiple of kv heads {target.kv_heads} (GQA groups)")

    for key, old, new in GrowthPlan(family.name, source, target, method, depth_method, direction).rows():
        if direction == "grow" and new < old:
            raise GrowkitError(f"{key} would shrink from {old} to {new}; use `growkit shrink`")
        if direction == "shrink" and new > old:
            raise GrowkitError(f"{key} would grow from {old} to {new}; use `growkit grow`")
    return GrowthPlan(family.name, source, target, method, depth_method if target.layers != source.layers else None,
                      direction)


def check_loadable(family: Family, config: Mapping[str, Any], plan: GrowthPlan, request: Mapping[str, Any],
                   operator_check: Callable[[GrowthPlan], None]) -> None:
    """Refuse a plan whose config the installed transformers would not load as the planned model, naming its rule
    and the nearest sizes that pass every check (this plan's, the operator's and transformers')."""
    problem = target_problem(family, config, plan.target)
    if problem is None:
        return

    def passes(changes: dict[str, int]) -> bool:
        try:
            candidate = make_plan(family, plan.source, **{**request, **changes})
            operator_check(candidate)
        except GrowkitError:
            return False
        return target_problem(family, config, candidate.target) is None

    mha = plan.source.heads == plan.source.kv_heads and request.get("kv_heads") is None
    hints = [f"`{as_options(_implied_dropped(c, mha))}`" for c in nearest_passing(plan.source, plan.target, passes)]
    advice = f"nearest sizes that pass: {', '.join(hints)}" if hints else "no nearby sizes pass"
    made = "grown" if plan.direction == "grow" else "shrunk"
    raise GrowkitError(f"the {made} model's config would not load: {problem}; {advice}")


def _implied_dropped(changes: dict[str, int], mha: bool) -> dict[str, int]:
    """Without `--kv-heads`, multi-head attention stays multi-head: `--heads 8` says `--heads 8 --kv-heads 8`."""
    if mha and changes.get("kv_heads") == changes.get("heads"):
        return {k: v for k, v in changes.items() if k != "kv_heads"}
    return changes


def check_limits(family: Family, config: Mapping[str, Any], plan: GrowthPlan) -> list[str]:
    """Refuse a plan that the family's declared limits say the math cannot do (one line, the family's reason), before
    any tensor is read; return a one-line note for each limit that says it runs but is not exact."""
    notes = []
    model = f"a {config.get('model_type')} model"
    for limit in family.limits:
        if not (limit.holds(dict(config)) and limit.concerns(plan.method, plan.depth_method)):
            continue
        what = f"--depth-method {plan.depth_method}" if limit.method.startswith("depth") else f"--method {plan.method}"
        if limit.verdict == "refused":
            raise GrowkitError(f"{what} cannot {plan.direction} {model}: {limit.reason}")
        notes.append(f"{what} does not keep {model}'s function exactly: {limit.reason}")
    return notes
