"""benchmarks/bench_progressive.py's GPU preset: its configuration, its time plan, and its code path run on a CPU.

No GPU is needed: `--smoke --device cpu` runs the same script, precision (bf16 autocast) and growth points at a tiny
size; the preset's own sizes are checked on shapes alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cli_util import REPO, cli_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_progressive as bench  # noqa: E402

SCRIPT = REPO / "benchmarks" / "bench_progressive.py"


def _grown_config(arch: str):
    from growkit.pipeline import growth_of_model

    return growth_of_model(bench._empty(bench.model_config(arch, bench.PRESETS["gpu"])), width=2).config


def test_gpu_preset_is_wider_deeper_bf16_on_cuda_and_planned_under_eight_minutes():
    gpu, cpu = bench.PRESETS["gpu"], bench.PRESETS["cpu"]
    assert (gpu.device, gpu.precision) == ("cuda", "bf16") and gpu.batch > cpu.batch
    for arch, width, layers in (("llama", "hidden_size", "num_hidden_layers"), ("gpt2", "n_embd", "n_layer")):
        small, tiny = bench.model_config(arch, gpu), bench.model_config(arch, cpu)
        assert getattr(small, width) > getattr(tiny, width) and getattr(small, layers) > getattr(tiny, layers)
        grown = _grown_config(arch)  # the growth plan's config dict
        assert grown[width] == 2 * getattr(small, width) and grown[layers] == getattr(small, layers)
    work = bench.plan(["gpt2", "llama"], gpu, list(bench.FRACTIONS), list(bench.METHODS))
    # Every run to the end: scratch, control, and a carried and a fresh run per growth point, both families.
    assert work["optimizer_steps"] == 2 * (2 + 2 * len(bench.FRACTIONS)) * gpu.steps
    assert work["estimated_seconds"] < 8 * 60


def test_smoke_run_of_the_gpu_preset_completes_on_cpu(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "gpu", "--smoke", "--device", "cpu", "--arch",
                        "llama", "--fractions", "0.25", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, env=cli_env(OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "progressive.json").read_text())
    assert doc["precision"] == "bf16" and doc["device"] == "cpu" and "--preset gpu --smoke" in doc["command"]
    (res,) = doc["results"]
    assert res["scratch"]["completed"] == bench.SMOKE["steps"]
    rows = {row["method"].split()[0]: row for row in res["rows"]}
    assert set(rows) == {"control", "carried", "fresh"}
    at = bench.grow_step(0.25, bench.Preset(**bench.SMOKE))
    assert rows["carried"]["grow_at"] == rows["fresh"]["grow_at"] == at
    assert rows["carried"]["curve"]["completed"] > at  # it grew and trained on (or reached the target) after growth
    assert (out / "progressive.md").read_text().startswith(f"`{doc['command']}`")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is visible")
def test_device_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "gpu", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2 and "no CUDA device is visible" in r.stderr
    assert not (tmp_path / "out").exists()
