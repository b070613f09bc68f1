"""OPT's cases the family matrix does not hold: a pre-LayerNorm model with project_in/project_out (its tied head
reads the fixed word-embedding width, so the final norm owes it no fan-in correction), and the one-line refusals."""

from __future__ import annotations

import pytest

from growkit import grow, shrink
from growkit.errors import GrowkitError


def test_clone_is_exact_with_projections_and_a_tied_head(tiny, tmp_path):
    v = grow(tiny("opt-proj"), tmp_path / "out", width="2x", verify=True, quiet=True).provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v
    assert v["max_abs_dlogits"] <= 1e-5 * v["max_abs_logit"], v


@pytest.mark.parametrize("case, run, request_, reason", [
    ("opt-post-ln-tied", grow, dict(width="2x"), "the one place its fan-in correction can go"),
    ("opt-post-ln-tied", shrink, dict(hidden=16, method="select"), "the one place its fan-in correction can go"),
    ("opt-no-gains", grow, dict(width="2x"), "the one place its fan-in correction can go"),
    ("opt-proj", shrink, dict(hidden=24, heads=3, method="select"), "would equal word_embed_proj_dim 24"),
])
def test_refused_in_one_line_before_anything_is_written(tiny, tmp_path, case, run, request_, reason):
    src = tiny(case)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir())
    with pytest.raises(GrowkitError) as err:
        run(src, tmp_path / "out", quiet=True, **request_)
    message = str(err.value)
    assert reason in message and message.startswith(str(src)) and "\n" not in message, message
    assert not (tmp_path / "out").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in src.iterdir()) == before

