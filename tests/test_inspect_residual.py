"""`inspect` sees what real models have: a massive residual-stream dimension (planted here as one embedding column
x300, as real checkpoints carry one) is named with where it stands out, and the axes' neuron norms get heavy-tail
measures; in the terminal tables, report.json and residual.png."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import growkit
from conftest import MODELS, randomize, tiny_config
from growkit.cli import app
from growkit.measure.activations import OUTLIER_RATIO

MASSIVE = 7


def _tiny(path: Path, name: str, plant: bool) -> Path:
    torch.manual_seed(0)
    model = randomize(T.AutoModelForCausalLM.from_config(tiny_config(name)), 0)
    if plant:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, MASSIVE] *= 300
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_planted_massive_dimension_is_named(tmp_path: Path, name: str) -> None:
    report = growkit.inspect(_tiny(tmp_path / "planted", name, plant=True), permutations=19)
    stream = report.residual
    assert stream is not None and stream.tokens.startswith("random tokens"), stream
    assert [o.dim for o in stream.outliers] == [MASSIVE], stream.outliers
    found = stream.outliers[0]
    assert found.where == "embedding, blocks 0-1", found
    assert found.peak_rms > 3 * OUTLIER_RATIO * found.median_at_peak, found  # GPT-2: 64x (wpe adds to the median)
    assert stream.argmax_dim == [MASSIVE] * 3
    hidden = next(a for a in report.axes if a.axis == "hidden")
    assert hidden.norm_tails.top == MASSIVE, hidden.norm_tails

    control = growkit.inspect(_tiny(tmp_path / "plain", name, plant=False), permutations=19)
    assert control.residual is not None and control.residual.outliers == [], control.residual.outliers
    plain_hidden = next(a for a in control.axes if a.axis == "hidden")
    assert hidden.norm_tails.max_over_median > plain_hidden.norm_tails.max_over_median


def test_cli_tables_json_and_plot_on_calibration_text(tmp_path: Path) -> None:
    text = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    out = tmp_path / "inspect"
    result = CliRunner().invoke(app, ["inspect", str(MODELS / "tiny-gpt2"), "--out", str(out), "--permutations", "19",
                                      "--calibration", str(text), "--calibration-tokens", "512"])
    assert result.exit_code == 0, result.output
    for words in ("residual stream: per-dimension RMS", "textwrap.py", "outlier dimensions", "Hill"):
        assert words in result.output, words
    report = json.loads((out / "report.json").read_text())
    stream = report["residual"]
    assert stream["tokens"] == "calibration text textwrap.py" and stream["token_count"] == 512
    assert len(stream["points"]) == report["sizes"]["layers"] + 1
    assert len(stream["rms"][0]) == report["sizes"]["hidden"]
    tails = report["axes"][0]["norm_tails"]
    assert set(tails) == {"count", "kurtosis", "max_over_median", "hill_alpha", "top"}
    png = out / "residual.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_no_activations_and_bad_calibration(tmp_path: Path) -> None:
    report = growkit.inspect(MODELS / "tiny-gpt2", permutations=19, activations=False)
    assert report.residual is None
    result = CliRunner().invoke(app, ["inspect", str(MODELS / "tiny-gpt2"), "--calibration",
                                      str(tmp_path / "absent.txt")])
    assert result.exit_code != 0 and "absent.txt: calibration file not found" in str(result.exception)
