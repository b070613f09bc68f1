"""Growth and shrinking operators, by the name users give on the command line."""

from __future__ import annotations

import inspect
from typing import Any

from growkit.errors import GrowkitError
from growkit.operators.base import Operator
from growkit.operators.rc_sample import RCSample
from growkit.operators.shrink import Select, Subclone
from growkit.operators.width import Clone, CopyPad, Net2Net

OPERATORS: dict[str, type[Operator]] = {op.name: op for op in (Clone, CopyPad, Net2Net, RCSample, Subclone, Select)}


def get_operator(name: str, **options: Any) -> Operator:
    """An operator instance; `options` are operator-specific (e.g. an estimator or calibration files)."""
    if name not in OPERATORS:
        raise GrowkitError(f"unknown method {name!r}; choose one of {', '.join(sorted(OPERATORS))}")
    accepted = inspect.signature(OPERATORS[name]).parameters
    for key in options:
        if key not in accepted:
            raise GrowkitError(f"--{key.replace('_', '-')} does not apply to --method {name}")
    return OPERATORS[name](**options)
