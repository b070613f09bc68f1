"""Growth and shrinking operators, by the name users give on the command line."""

from __future__ import annotations

from typing import Any

from growkit.errors import GrowkitError
from growkit.operators.base import Operator
from growkit.operators.width import Clone, CopyPad, Net2Net
from growkit.operators.shrink import Select, Subclone

OPERATORS: dict[str, type[Operator]] = {op.name: op for op in (Clone, CopyPad, Net2Net)}


def get_operator(name: str, **options: Any) -> Operator:
    """An operator instance; `options` are operator-specific (e.g. an estimator or calibration files)."""
    if name not in OPERATORS:
        raise GrowkitError(f"unknown method {name!r}; choose one of {', '.join(sorted(OPERATORS))}")
    return OPERATORS[name](**options)


OPERATORS[Subclone.name] = Subclone
OPERATORS[Select.name] = Select
