"""Continued training: loss goes down, resume is exact, bad input fails early, two processes shard the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import growkit
from cli_util import start_paused, torchrun_command
from growkit.errors import GrowkitError
from growkit.train.blocks import BlockSampler, TokenBlocks, load_blocks
from growkit.train.data import stdlib_files, write_stdlib_corpus

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "models" / "tokenizer"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {"train": write_stdlib_corpus(d / "train.txt", "train", max_bytes=300_000),
            "val": write_stdlib_corpus(d / "val.txt", "val", max_bytes=40_000)}


def fresh_checkpoint(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """A randomly initialised small model with the bundled stdlib tokenizer, saved as a real checkpoint."""
    cfg = (T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=128)
           if family == "llama" else
           T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=2048, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(seed)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stdlib_split_is_deterministic_and_disjoint():
    train, val = stdlib_files("train"), stdlib_files("val")
    assert train == sorted(train, key=str) and len(val) > 5 and len(train) > 10 * len(val)
    assert not set(train) & set(val)
    assert stdlib_files("train") == train


def test_twenty_steps_lower_the_loss(tmp_path, corpus):
    ckpt = fresh_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
    res = growkit.train(ckpt, corpus["train"], out, eval_data=corpus["val"], steps=20, lr=1e-2, warmup=2, batch_size=8,
                        seq_len=64, eval_every=20, quiet=True)
    curve = losses(out)
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < curve[0] - 1.0, curve  # from ~7.6 (ln 2048) down by more than a nat
    assert res.eval_loss is not None and res.eval_loss < curve[0] - 0.7  # held-out text improves too
    # The output is a plain HF checkpoint (weights + tokenizer) with metrics and a loss curve beside it.
    model = T.AutoModelForCausalLM.from_pretrained(out)
    T.AutoTokenizer.from_pretrained(out)
    assert torch.equal(model.model.norm.weight, res.model.model.norm.weight)
    for name in ("metrics.jsonl", "metrics.csv", "loss.png", "training.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "training.json").read_text())["steps"] == 20


def test_resume_matches_uninterrupted_run(tmp_path, corpus):
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    kw = dict(steps=12, lr=2e-3, batch_size=4, seq_len=64, grad_accum=2, quiet=True, seed=3)
    growkit.train(ckpt, corpus["train"], tmp_path / "a", **kw)
    first = growkit.train(ckpt, corpus["train"], tmp_path / "b", stop_after=5, **kw)
    assert first.stopped_early and first.steps == 5 and (tmp_path / "b" / "checkpoint-5").is_dir()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    growkit.train(ckpt, corpus["train"], tmp_path / "b", resume=True, **kw)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_start_step_continues_the_schedule_and_the_data_stream(tmp_path, corpus):
    """A grown model picks up where its small model stopped: same LR and same blocks as the uninterrupted run's
    tail (start_step), or the same blocks under a fresh schedule (data_start alone). With lr ~ 0 the weights do not
    move, so each step's loss identifies the batch it read."""
    import math

    from growkit.train.loop import TrainConfig, lr_lambda

    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    kw = dict(steps=10, lr=1e-12, batch_size=2, seq_len=32, warmup=2, weight_decay=0.0, quiet=True, seed=5)
    full = growkit.train(ckpt, corpus["train"], tmp_path / "full", **kw).history
    tail = growkit.train(ckpt, corpus["train"], tmp_path / "tail", start_step=6, **kw).history
    fresh = growkit.train(ckpt, corpus["train"], tmp_path / "fresh", **{**kw, "steps": 4}, data_start=6).history
    assert [r["step"] for r in tail] == [7, 8, 9, 10]
    assert [r["loss"] for r in tail] == pytest.approx([r["loss"] for r in full[6:]], abs=1e-5)
    assert [r["lr"] for r in tail] == pytest.approx([r["lr"] for r in full[6:]], rel=1e-9)
    assert [r["loss"] for r in fresh] == pytest.approx([r["loss"] for r in full[6:]], abs=1e-5)
    f = lr_lambda(TrainConfig(steps=4, warmup=2))
    assert [r["lr"] for r in fresh] == pytest.approx([1e-12 * f(s) for s in range(4)], rel=1e-9)
    assert len({round(r["loss"], 4) for r in full}) > 5  # the batches do differ, so the match above means something
    assert not math.isclose(tail[0]["lr"], fresh[0]["lr"])
    with pytest.raises(GrowkitError, match="start-step"):
        growkit.train(ckpt, corpus["train"], tmp_path / "bad", **{**kw, "start_step": 10})


def test_sampler_shards_match_one_process_with_the_global_batch():
    s = BlockSampler(50, seed=1)
    world, accum, batch = 2, 3, 4
    for step in (0, 7):  # step 7 crosses an epoch boundary
        for micro in range(accum):
            both = [i for r in range(world) for i in s.micro_batch(step, micro, r, world, accum, batch)]
            assert both == s.micro_batch(step, micro, 0, 1, accum, world * batch)
    assert sorted(s.positions(0, 50)) == list(range(50))


def test_streamed_tokenization_matches_in_memory(tmp_path, corpus):
    tok = T.AutoTokenizer.from_pretrained(TOKENIZER)
    text = corpus["val"].read_text()
    on_disk = load_blocks([corpus["val"]], tok, 64, tmp_path / "cache")
    in_memory = TokenBlocks.from_texts([text], tok, 64)
    assert len(on_disk) == len(in_memory) > 10
    assert torch.equal(on_disk.batch(range(len(on_disk))), in_memory.batch(range(len(in_memory))))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("def f():\n    pass\n", "x = 1\n") * 40))
    blocks = load_blocks([jsonl], tok, 16, tmp_path / "cache")
    assert (torch.tensor(blocks.tokens) == tok.eos_token_id).sum() == 80


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # this checkout, whatever pip installed


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "growkit.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=240)


def test_interrupted_training_says_so_and_keeps_its_checkpoints(tmp_path, corpus):
    import signal

    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    out = tmp_path / "run"
    # the run waits after its first checkpoint until the signal comes
    proc = start_paused("checkpoint-saved", tmp_path / "paused", "train", ckpt, "--data", corpus["train"], "-o", out,
                        "--steps", "100000", "--save-every", "2", "--batch-size", "2", "--seq-len", "32", "-q")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "training interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err, err
    assert list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["missing-data", "empty-file", "seq-len", "no-tokenizer"])
def test_bad_input_fails_before_training(tmp_path, corpus, case):
    ckpt = fresh_checkpoint(tmp_path / "ckpt")
    data, seq_len, match = corpus["train"], 64, None
    if case == "missing-data":
        data, match = tmp_path / "nope.txt", "does not exist"
    elif case == "empty-file":
        data = tmp_path / "empty.txt"
        data.write_text("")
        match = "is empty"
    elif case == "seq-len":
        seq_len, match = 1024, "exceeds the model's 128 positions"
    else:
        for f in TOKENIZER.iterdir():
            (ckpt / f.name).unlink()
        match = "has no tokenizer"
    with pytest.raises(GrowkitError, match=match):
        growkit.train(ckpt, data, tmp_path / "out", steps=5, seq_len=seq_len, quiet=True)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    if case == "empty-file":  # the CLI prints one line and exits 2
        r = _cli("train", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--steps", "5")
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_two_processes_shard_data_and_match_one_process(tmp_path, corpus):
    """torchrun x2 (gloo, CPU) on a grown checkpoint with µP from growkit.json == one process with batch 2B."""
    src = fresh_checkpoint(tmp_path / "small", "gpt2")
    grown = growkit.grow(src, tmp_path / "grown", width=2, method="clone", noise_snr_db=20, quiet=True).out_dir
    args = ["--data", str(corpus["train"]), "--steps", "6", "--lr", "2e-3", "--seq-len", "64", "--seed", "1", "-q"]
    r = subprocess.run(torchrun_command(2, "train", grown, "-o", tmp_path / "ddp", "--batch-size", "2", *args),
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "training.json").read_text())
    assert summary["processes"] == 2 and summary["mup"] is True and "growkit.json" in summary["mup_base"]
    assert summary["tokens"] == 6 * 2 * 2 * 64
    r1 = _cli("train", str(grown), "-o", str(tmp_path / "one"), "--batch-size", "4", *args)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=2e-5)
    wa, wb = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    prov = json.loads((tmp_path / "ddp" / "growkit.json").read_text())
    assert prov["operator"] == "clone" and prov["training"]["steps"] == 6
