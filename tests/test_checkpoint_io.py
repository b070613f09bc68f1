"""Reading and writing real checkpoints: sharded in and out, bare .safetensors files, default output paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import save_file

from growkit import grow, load_checkpoint
from growkit.errors import GrowkitError
from growkit.verify import compare, random_tokens

from conftest import MODELS


def _logit_gap(a_dir, b_dir) -> float:
    a = T.AutoModelForCausalLM.from_pretrained(a_dir).eval()
    b = T.AutoModelForCausalLM.from_pretrained(b_dir).eval()
    return compare(a, b, random_tokens(a.config.vocab_size))["max_abs_dlogits"]


def test_sharded_output_round_trips_as_sharded_input(tiny, tmp_path):
    src = tiny("llama-gqa4")
    first = grow(src, tmp_path / "a", width="2x", max_shard_size="20KB", quiet=True)
    index = json.loads((first.out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(_nbytes(first.out_dir / s, n) for n, s in index["weight_map"].items())
    # The sharded output is itself a valid input: grow it again, into one shard.
    second = grow(first.out_dir, tmp_path / "b", layers="2x", depth_method="identity", quiet=True)
    assert (second.out_dir / "model.safetensors").is_file()
    assert _logit_gap(src, second.out_dir) < 1e-5


def _nbytes(file, name) -> int:
    with safe_open(file, "pt") as f:
        t = f.get_tensor(name)
    return t.numel() * t.element_size()


def test_bare_safetensors_with_config_beside_and_default_output(tiny, tmp_path):
    src = tiny("gpt2")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(src / "model.safetensors", bare / "small.safetensors")
    shutil.copy(src / "config.json", bare / "config.json")
    # Exactly as a user would type it: the output lands beside the file.
    subprocess.run([sys.executable, "-m", "growkit.cli", "grow", str(bare / "small.safetensors"), "--width", "2x",
                    "--quiet"], check=True)
    out = bare / "small-grown"
    assert (out / "config.json").is_file()
    assert _logit_gap(src, out) < 1e-5


def test_bare_safetensors_with_config_in_metadata_and_without_one(tiny, tmp_path):
    src = tiny("qwen2")
    ckpt = load_checkpoint(src)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    with_meta = tmp_path / "with-meta.safetensors"
    save_file(tensors, with_meta, metadata={"format": "pt", "config": json.dumps(ckpt.config)})
    assert load_checkpoint(with_meta).config == ckpt.config
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, plain)
    # Qwen2's q/k/v biases say which family it is, but no shape says how many heads: refused, not guessed.
    with pytest.raises(GrowkitError, match="cannot infer a llama config: the tensor shapes do not say how many "
                                           "attention heads"):
        load_checkpoint(plain)


def test_grown_file_carries_config_and_provenance_in_metadata(tiny, tmp_path):
    result = grow(tiny("llama-tied"), tmp_path / "out", width="2x", quiet=True, seed=7)
    with safe_open(result.out_dir / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["hidden_size"] == 64
    assert json.loads(meta["growkit"])["options"]["seed"] == 7
    prov = json.loads((result.out_dir / "growkit.json").read_text())
    assert prov["source"]["config"]["hidden_size"] == 32 and prov["sizes"]["hidden"] == [32, 64]
    # A lone grown file still describes itself: it can be grown again without its directory.
    lone = tmp_path / "lone.safetensors"
    shutil.copy(result.out_dir / "model.safetensors", lone)
    assert load_checkpoint(lone).config["hidden_size"] == 64


def test_support_files_are_copied_and_dtype_kept(tmp_path):
    result = grow(MODELS / "tiny-gpt2", tmp_path / "out", width="2x", quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (result.out_dir / name).read_bytes() == (MODELS / "tiny-gpt2" / name).read_bytes()
    tok = T.AutoTokenizer.from_pretrained(result.out_dir)
    assert tok("def f(x):\n    return x")["input_ids"]


def test_dtype_option_and_bf16_source(tiny, tmp_path):
    src = tiny("llama-mha")
    half = grow(src, tmp_path / "bf16", dtype="bf16", quiet=True)
    with safe_open(half.out_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    # A bf16 source grows (in fp32 arithmetic) into a bf16 checkpoint by default.
    again = grow(half.out_dir, tmp_path / "again", width="2x", quiet=True)
    assert json.loads((again.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_dry_run_writes_nothing(tiny, tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "growkit.cli", "grow", str(tiny("mistral")), "-o", str(out),
                           "--width", "2x", "--layers", "3", "--dry-run"], capture_output=True, text=True, check=True)
    assert "hidden" in proc.stdout and "64" in proc.stdout and "parameters" in proc.stdout
    assert not out.exists() and not list(tmp_path.glob(".growkit-tmp-*"))
