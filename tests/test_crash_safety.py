"""Crash safety: SIGINT/SIGTERM mid-write remove everything; `kill -9` at random points never leaves a directory at
the output path; a later run removes what a dead run left and reports what a live (or foreign) run owns."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from cli_util import assert_nothing_written, error_line, run_cli, start_cli
from growkit.checkpoint.writer import CheckpointWriter, TensorEntry, _exchange, _host, scan_temporaries
from growkit.pipeline import clean_temporaries


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A Llama-shaped checkpoint (36 MB) whose 2x growth writes ~140 MB: long enough to interrupt mid-write."""
    path = tmp_path_factory.mktemp("big") / "llama"
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4,
                        num_hidden_layers=6, vocab_size=8192, max_position_embeddings=256)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def wait_for_weights(out: Path, proc: subprocess.Popen, min_bytes: int = 1 << 20, timeout: float = 120) -> Path:
    """Block until the run's temporary directory holds at least `min_bytes` of weights; return that directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in out.parent.glob(f".growkit-tmp-{out.name}-*"):
            shard = tmp / "model.safetensors"
            try:
                if shard.stat().st_size >= min_bytes:
                    return tmp
            except OSError:
                pass
        assert proc.poll() is None, f"the run ended before writing {min_bytes} bytes: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError("no weights appeared")


def assert_complete(out: Path) -> None:
    """A finished checkpoint: no in-progress marker, config, provenance, and a shard whose header covers the file."""
    assert not (out / ".incomplete").exists()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 512
    assert json.loads((out / "growkit.json").read_text())["sizes"]["hidden"] == [256, 512]
    with safe_open(out / "model.safetensors", "pt") as f:  # safetensors checks the file is fully covered
        assert "model.embed_tokens.weight" in f.keys()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write_removes_everything(tmp_path, big, sig):
    out = tmp_path / "out"
    proc = start_cli("grow", big, "-o", out, "--width", "2x", "--quiet")
    wait_for_weights(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    error_line(proc.returncode, err, out, f"interrupted by {sig.name}", "not written", "partial files removed")
    assert proc.returncode == 130
    assert_nothing_written(out)


def test_kill_9_never_leaves_an_output_and_the_next_run_cleans_up(tmp_path, big):
    out = tmp_path / "out"
    rng = random.Random(7)
    mid_write = 0
    left: set[Path] = set()
    for _ in range(3):
        proc = start_cli("grow", big, "-o", out, "--width", "2x", "--quiet")
        wait_for_weights(out, proc, min_bytes=1 << 16)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.communicate()
        if out.exists():  # the run had finished: then it must be whole
            assert_complete(out)
            shutil.rmtree(out)
        else:
            mid_write += 1
        new = set(tmp_path.glob(".growkit-tmp-*")) - left
        for tmp in new:  # recognisable: named for the output, this host and the dead pid; marked incomplete
            assert tmp.name.startswith(f".growkit-tmp-out-h{_host()}-p{proc.pid}-"), tmp.name
            assert (tmp / ".incomplete").exists() or not (tmp / "growkit.json").exists()
        left |= new
    assert mid_write, "no kill landed mid-write"
    assert left and all(t.state == "stale" for t in scan_temporaries(out))

    proc = run_cli("grow", big, "-o", out, "--width", "2x", "--quiet")
    assert proc.returncode == 0, proc.stderr
    for tmp in left:
        assert f"growkit: removing {tmp} was left by an interrupted run" in proc.stderr
    assert not list(tmp_path.glob(".growkit-tmp-*"))
    assert_complete(out)


# --- ownership of temporary directories ---------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_are_classified_and_only_dead_ones_removed(tmp_path, capsys):
    out = tmp_path / "model"
    dead = tmp_path / f".growkit-tmp-model-h{_host()}-p{_dead_pid()}-0badf00d"
    dead.mkdir()
    (dead / ".incomplete").write_text("")
    foreign = tmp_path / ".growkit-tmp-model-hsome_other_host-p1-deadbeef"
    foreign.mkdir()
    other_output = tmp_path / f".growkit-tmp-model2-h{_host()}-p{_dead_pid()}-2badf00d"  # another output's
    other_output.mkdir()
    # A live writer for the same output in this very process: its pid is alive and it holds the lock.
    writer = CheckpointWriter(out, [TensorEntry("w", (2,), torch.float32)], 1 << 20, {})
    # A directory with a dead pid in its name but a held lock (a writer in another pid namespace, say).
    locked = tmp_path / f".growkit-tmp-model-h{_host()}-p{_dead_pid()}-1badf00d"
    locked.mkdir()
    import fcntl

    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        states = {t.path: t.state for t in scan_temporaries(out)}
        assert states == {dead: "stale", foreign: "other host", writer.tmp: "running", locked: "running"}
        clean_temporaries(out)
        err = capsys.readouterr().err
        assert f"removing {dead} was left by an interrupted run" in err
        assert f"{foreign} was left by a run on host some_other_host" in err and "remove it by hand" in err
        assert f"{writer.tmp} belongs to a growkit run still in progress (pid {os.getpid()}); left alone" in err
        assert not dead.exists() and foreign.exists() and locked.exists() and writer.tmp.exists()
        assert other_output.exists()
    finally:
        os.close(fd)
        writer.abort()
    assert not writer.tmp.exists()


def test_overwrite_replaces_the_output_and_leaves_nothing_else(tiny, tmp_path):
    from growkit import grow

    out = tmp_path / "out"
    grow(tiny("gpt2"), out, width="2x", quiet=True)
    grow(tiny("llama-mha"), out, width="3x", quiet=True, overwrite=True)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src-gpt2", "src-llama-mha"]


def test_overwrite_swaps_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a"), (b / "f").write_text("b")
    if not _exchange(a, b):
        pytest.skip("this file system has no atomic exchange; the writer falls back to two renames")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    """Two runs racing for one output: the second to finish must not clobber the first's (without --overwrite)."""
    from growkit.errors import GrowkitError

    out = tmp_path / "out"
    writer = CheckpointWriter(out, [TensorEntry("w", (2,), torch.float32)], 1 << 20, {})
    writer.add("w", torch.ones(2))
    out.mkdir()  # the other run's output lands first
    (out / "theirs").write_text("x")
    with pytest.raises(GrowkitError, match="appeared meanwhile"):
        with writer:
            writer.commit()
    assert (out / "theirs").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
