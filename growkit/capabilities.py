"""The family x method table of README.md, made from the registry, the operators and every family's declared limits.

`python -m growkit.capabilities` prints it; tests/test_families.py checks that README.md holds exactly this table, so
the README cannot drift from what the code refuses or cannot keep exact.
"""

from __future__ import annotations

from growkit.arch.registry import FAMILIES
from growkit.arch.spec import Family
from growkit.operators import OPERATORS
from growkit.operators.depth import DEPTH_METHODS, EXACT_DEPTH

_LABELS = {"refused": "no", "inexact": "approx."}
LEGEND = ("exact: the grown model computes the source's function (max |Δlogits| ≤ 1e-5 × max |logit| in "
          "tests/test_families.py; `moe` in tests/test_upcycle.py and tests/test_moe_shrink.py); yes: runs and loads (`select` only shrinks; stacked or interleaved layers act "
          "again, which changes the function); approx.: runs and loads, the function is not kept; no: refused in one "
          "line before any tensor is read.")


def _columns() -> list[tuple[str, str, str | None, bool]]:
    """(header, operator, depth method, exact where no limit says otherwise) for every column."""
    return ([(f"`{name}`", name, None, op.exact) for name, op in OPERATORS.items()]
            + [(f"depth `{m}`", "", m, m in EXACT_DEPTH) for m in DEPTH_METHODS])


def _cell(family: Family, method: str, depth: str | None, exact: bool, notes: list[str]) -> str:
    always, sometimes = [], []
    for limit in family.limits:
        if not limit.concerns(method, depth):
            continue
        text = limit.reason + (f" (when `{limit.when[0]}` is `{limit.when[1]!r}`)" if limit.when else "")
        if text not in notes:
            notes.append(text)
        (sometimes if limit.when else always).append(f"{_LABELS[limit.verdict]} [{notes.index(text) + 1}]")
    return ", ".join(always or ["exact" if exact else "yes"]) + "".join(f"; {s}" for s in sometimes)


def family_table() -> str:
    """README's family table (markdown): a row per family, a column per operator and depth method, notes below."""
    columns = _columns()
    notes: list[str] = []
    rows = [[f"`{f.name}` ({', '.join(f.model_types)})",
             *(_cell(f, method, depth, exact, notes) for _, method, depth, exact in columns)] for f in FAMILIES]
    lines = ["| family (model types) | " + " | ".join(h for h, *_ in columns) + " |",
             "|---" * (len(columns) + 1) + "|",
             *("| " + " | ".join(row) + " |" for row in rows), "", LEGEND, ""]
    lines += [f"[{i}] {text}" + ("  " if i < len(notes) else "") for i, text in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(family_table(), end="")
