"""`growkit inspect` on the bundled tiny GPT-2: tables, JSON report, plots; the Python API returns the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import growkit
from growkit import grow
from growkit.cli import app

MODELS = Path(__file__).resolve().parent.parent / "models"


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_inspect_cli_writes_report_and_plots(tmp_path):
    clone = grow(MODELS / "tiny-gpt2", tmp_path / "clone", width="2x", quiet=True).out_dir
    out = tmp_path / "inspect"
    result = CliRunner().invoke(app, ["inspect", str(MODELS / "tiny-gpt2"), "--compare", str(clone), "--out", str(out),
                                      "--permutations", "19"])
    assert result.exit_code == 0, result.output
    assert "RC covariance test" in result.output and "hidden" in result.output
    for name in ("norms.png", "rc.png", "qq.png"):
        assert _png(out / name), name
    report = json.loads((out / "report.json").read_text())
    assert report["model_type"] == "gpt2" and report["units"] == "mf" and report["permutations"] == 19
    assert report["sizes"]["hidden"] == 64 and report["sizes"]["layers"] == 2
    tensors = {t["name"]: t for t in report["tensors"]}
    assert len(tensors) == 28  # 4 global + 12 per layer x 2
    c_fc = tensors["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc["fan_in"] == 64 and c_fc["rows_axis"] == "ffn" and c_fc["cols_axis"] == "hidden"
    assert c_fc["rows"]["count"] == 256 and c_fc["cols"]["count"] == 64
    rc = c_fc["rc"]
    for key in ("corr_row", "corr_col", "corr_disjoint", "p_row", "p_col", "p_disjoint", "z_row"):
        assert key in rc
    assert 0 < rc["p_row"] <= 1 and rc["permutations"] == 19
    assert tensors["transformer.ln_f.weight"]["rc"] is None and tensors["transformer.ln_f.weight"]["rows"] is None
    axes = {a["axis"]: a for a in report["axes"]}
    assert set(axes) == {"hidden", "ffn@0", "ffn@1", "kv_heads@0", "kv_heads@1"}
    assert axes["hidden"]["neurons"] == 64 and axes["hidden"]["tensors"] == 24
    assert axes["ffn@0"]["loglik"]["empirical"] is None  # -inf is not JSON: written as null
    assert axes["ffn@0"]["loglik"]["kde"] is not None and axes["ffn@0"]["loglik_rank"] == 8
    # a 2x clone has exactly the source's norm distributions in mean-field units (tied final norm included)
    assert report["compare"] == str(clone)
    assert len(report["distances"]) == 38  # rows + cols of 10 matrices, entries of 18 vectors
    assert max(d["distance"]["w1_rel"] for d in report["distances"]) < 1e-5
    assert set(report["files"]) == {str(out / n) for n in ("report.json", "norms.png", "rc.png", "qq.png",
                                                           "residual.png")}


def test_inspect_python_api_returns_the_report():
    report = growkit.inspect(MODELS / "tiny-llama", permutations=19, units="sp")
    assert type(report).__name__ == "InspectReport" and report.files == [] and report.compare is None
    q = report.tensor("model.layers.1.self_attn.q_proj.weight")
    assert q.rows_axis == "kv_headsxqgroupxhead_dim" and q.unit == pytest.approx(8.0)  # sqrt(fan-in 64)
    assert {a.axis for a in report.axes} >= {"hidden", "ffn@0", "kv_heads@1", "qgroup@0"}
    rows = report.rc_table()
    assert len(rows) == 16 and all("passes" in r for r in rows)
    assert report.samples()["model.embed_tokens.weight"]["rows"].shape == (64,)


def test_inspect_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code != 0
    with pytest.raises(growkit.GrowkitError, match="units"):
        growkit.inspect(MODELS / "tiny-gpt2", units="furlongs")
