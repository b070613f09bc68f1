"""The family x operator matrix's figures: max |Δlogits| / max |logit| of every cell, as a markdown table.

Usage: python benchmarks/bench_families.py [--cases CASE ...] [--out-dir DIR]
The cases, cells and the INEXACT / REFUSED tables are `tests/test_families.py`'s (tiny random-weight models from
`tests/conftest.tiny_config`, compared on random tokens by `growkit.verify`), so the figures are the ones that test
asserts on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_families import CASES, CELLS, EXACT, INEXACT, REFUSED, _resolved, _save  # noqa: E402

from growkit.errors import GrowkitError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="growkit-families-"))
    print("| case | cell | max abs Δlogits / max abs logit | max abs logit | Δloss | claimed |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        src = _save(case, work / case / "src")
        for cell, (run, request) in CELLS.items():
            claimed = ("refused" if (case, cell) in REFUSED else f"inexact ({INEXACT[case, cell]})"
                       if (case, cell) in INEXACT else "exact" if cell in EXACT else "runs")
            try:
                v = run(src, work / case / cell, verify=True, quiet=True,
                        **_resolved(request, src)).provenance["verification"]
            except GrowkitError as exc:
                print(f"| {case} | {cell} | refused: {str(exc).split(': ', 1)[1]} | | | {claimed} |")
                continue
            print(f"| {case} | {cell} | {v['max_abs_dlogits'] / v['max_abs_logit']:.2e} | {v['max_abs_logit']:.3g} "
                  f"| {v['dloss']:+.2e} | {claimed} |")


if __name__ == "__main__":
    main()
