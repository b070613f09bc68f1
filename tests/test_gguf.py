"""GGUF input: small GGUF files written with `gguf`'s own writer grow exactly as the same weights in safetensors do,
keep their tokenizer, say they were dequantized, and bad GGUF input gets the usual one-line error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import growkit
from cli_util import REPO, assert_nothing_written, cli_command, cli_env, error_line, run_cli, run_cli_batch
from gguf_files import tiny_llama, write_llama_gguf


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.mark.parametrize("tied,qtype", [(True, "Q4_1"), (False, "F16"), (False, "F32")])
def test_grow_from_gguf_equals_grow_from_the_same_safetensors(tmp_path: Path, tied: bool, qtype: str) -> None:
    model = tiny_llama(tied)
    expected = write_llama_gguf(model, tmp_path / "tiny.gguf", qtype)
    model.load_state_dict(expected, strict=not tied)
    model.save_pretrained(tmp_path / "same-weights")

    from_gguf = growkit.grow(tmp_path / "tiny.gguf", tmp_path / "a", width="2x", noise_snr_db=10, seed=3,
                             quiet=True, verify=True)
    growkit.grow(tmp_path / "same-weights", tmp_path / "b", width="2x", noise_snr_db=10, seed=3, quiet=True)

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    config_a, config_b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b"))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "tie_word_embeddings", "model_type"):
        assert config_a[key] == config_b[key], key
    assert "quantization_config" not in config_a

    v = from_gguf.provenance["verification"]
    assert v["max_abs_dlogits"] <= 1e-5 * v["max_abs_logit"], v
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v
    assert "textwrap" in v["tokens"], v  # the GGUF's tokenizer came through and verification used real text
    source = from_gguf.provenance["source"]
    assert source["format"] == "gguf" and qtype in source["dequantized_from"], source
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tokenizer.decode(tokenizer("the hen")["input_ids"]) == "the hen"


def test_cli_grows_a_gguf_file_and_says_it_was_dequantized(tmp_path: Path) -> None:
    write_llama_gguf(tiny_llama(tied=True), tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    run = run_cli("grow", tmp_path / "tiny.Q8_0.gguf", "--width", "2x", "--verify", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "function preservation" in run.stdout and "no missing or unexpected keys" in run.stdout, run.stdout
    assert "dequantized to fp32 from GGUF tensors Q8_0 x" in run.stderr, run.stderr
    assert "quantization error" in run.stderr, run.stderr
    out = tmp_path / "tiny.Q8_0-grown"
    provenance = json.loads((out / "growkit.json").read_text())
    assert provenance["source"]["dequantized_from"]["Q8_0"] > 0
    assert (out / "tokenizer.json").is_file()


def test_inspect_and_shrink_read_gguf(tmp_path: Path) -> None:
    write_llama_gguf(tiny_llama(tied=False), tmp_path / "tiny.gguf", "F32")
    report = growkit.inspect(tmp_path / "tiny.gguf", permutations=19)
    assert report.model_type == "llama" and report.sizes["hidden"] == 64
    result = growkit.shrink(tmp_path / "tiny.gguf", tmp_path / "small", width="0.5x", method="select", quiet=True,
                            verify=True)
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [], v


def _no_gguf_package(root: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes `import gguf` fail as it does where the package is absent."""
    shadow = root / "no-gguf" / "gguf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'gguf'\")\n")
    return shadow.parent


def test_bad_gguf_input_gets_one_line(tmp_path: Path) -> None:
    model = tiny_llama(tied=True)
    write_llama_gguf(model, tmp_path / "ok.gguf", "Q8_0")
    raw = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file\n" * 64)
    write_llama_gguf(model, tmp_path / "stablelm.gguf", "F32", architecture="stablelm")
    write_llama_gguf(model, tmp_path / "holey.gguf", "F32", drop=("model.layers.1.mlp.down_proj.weight",))
    (tmp_path / "config.json").write_text("{}")
    out = tmp_path / "out"
    cases = [
        (["truncated.gguf"], ["truncated.gguf", "not a valid GGUF file, truncated or corrupt"]),
        (["junk.gguf"], ["junk.gguf", "not a valid GGUF file", "magic"]),
        (["stablelm.gguf"], ["stablelm.gguf", "unsupported model_type 'stablelm'"]),
        (["holey.gguf", "--quiet"], ["holey.gguf", "lacks tensor(s) for model.layers.1.mlp.down_proj.weight"]),
        (["ok.gguf", "--config", str(tmp_path / "config.json")], ["ok.gguf", "carries its own config"]),
    ]
    runs = run_cli_batch([["grow", str(tmp_path / args[0]), "--width", "2x", "-o", out, *args[1:]]
                          for args, _ in cases])
    for (args, names), run in zip(cases, runs):
        error_line(run.returncode, run.stderr, *names)
        assert run.returncode == 2, (args, run.stderr)
        assert_nothing_written(out)

    env = cli_env()
    env["PYTHONPATH"] = f"{_no_gguf_package(tmp_path)}{os.pathsep}{env['PYTHONPATH']}"
    missing = subprocess.run(cli_command("grow", tmp_path / "ok.gguf", "-o", out, "--width", "2x"), env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    error_line(missing.returncode, missing.stderr, "ok.gguf", "growkit[gguf]")
    assert_nothing_written(out)
