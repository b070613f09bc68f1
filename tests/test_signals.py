"""SIGINT/SIGTERM at exact points (issue 11, items 8 and 14): during start-up they are never swallowed, after the
output is published they change nothing, and a swallowed one still stops the run before it publishes.

The points are reached deterministically through the GROWKIT_TEST_PAUSE hook (growkit.interrupts.pause_point): the
run creates a marker file there and waits; the test sends the signal once the marker exists. No timing guesses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import growkit
from cli_util import assert_nothing_written, cli_env, error_line, snapshot, start_paused

REPO = Path(__file__).resolve().parents[1]


def test_sigint_during_start_up_is_acted_on_not_swallowed(tmp_path, tiny):
    """Ctrl-C while the heavy imports run (where a broad `except` in a library used to swallow it, and the run then
    replaced the output with --overwrite): exit 130, the previous output untouched."""
    src = tiny("gpt2")
    out = tmp_path / "out"
    growkit.grow(src, out, width="2x", quiet=True)
    before = snapshot(out)
    proc = start_paused("start-up", tmp_path / "paused", "grow", src, "--width", "2x", "-o", out, "--overwrite",
                        "--seed", "1", "-q")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    error_line(proc.returncode, err, "interrupted by SIGINT during start-up", "nothing was written")
    assert proc.returncode == 130
    assert_nothing_written(out, before)


def test_signal_after_publishing_finishes_cleanly(tmp_path, tiny):
    """SIGTERM just after the output was renamed into place: the run says what it wrote and exits 0 (it used to
    exit 130/143 with no message although the output had been replaced)."""
    out = tmp_path / "out"
    proc = start_paused("published", tmp_path / "paused", "grow", tiny("llama-gqa4"), "--width", "2x", "-o", out)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"wrote {out}" in " ".join(stdout.split())
    assert "growkit: note: SIGTERM arrived after the work was complete; finished normally" in err
    assert (out / "model.safetensors").is_file() and (out / "growkit.json").is_file()
    assert not list(tmp_path.glob(".growkit-tmp-*"))


_SWALLOWED = r"""
import os, signal, sys, time
from growkit import interrupts
interrupts.install()
interrupts.arm()
try:  # what a library's bare `except:` does to a KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except BaseException:
    pass
import growkit
try:
    growkit.grow(sys.argv[1], sys.argv[2], width="2x", quiet=True)
except KeyboardInterrupt as exc:
    print("stopped by", exc)
"""


def test_a_swallowed_interrupt_still_stops_the_run_before_it_publishes(tmp_path, tiny):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SWALLOWED, str(tiny("gpt2")), str(out)], env=cli_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped by SIGINT"
    assert_nothing_written(out)


def test_interrupt_during_the_final_training_export_leaves_no_part_of_it(tmp_path):
    """Item 14: the final model is exported whole into a hidden directory and moved in only when complete."""
    from test_train import fresh_checkpoint

    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    data = tmp_path / "data.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 300)
    out = tmp_path / "run"
    proc = start_paused("final-export", tmp_path / "paused", "train", ckpt, "-d", data, "-o", out, "--steps", "2",
                        "--batch-size", "2", "--seq-len", "16", "-q")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    error_line(proc.returncode, err, "training interrupted by SIGINT", "the final model was not written")
    names = {p.name for p in out.iterdir()}
    assert not names & {"config.json", "model.safetensors", "README.md", "training.json", "tokenizer.json"}, names
    assert not [n for n in names if n.startswith(".final-model-")], names


def test_data_cache_is_complete_or_absent(tmp_path):
    """Item 14: failed tokenizations leave no temporaries, and ids without their description (a crash between the
    two renames) are tokenized again instead of failing for ever."""
    import pytest
    from transformers import AutoTokenizer

    from growkit.errors import GrowkitError
    from growkit.train.blocks import load_blocks

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "tokenizer")
    cache = tmp_path / "cache"
    bad = {"binary.txt": bytes(range(256)) * 4, "bad-end.txt": b"good text\n" * 100 + b"\xff\xfe",
           "no-field.jsonl": b'{"text": "a"}\n{"body": "b"}\n'}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GrowkitError):
            load_blocks([tmp_path / name], tokenizer, 16, cache)
        assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")], name
    good = tmp_path / "good.txt"
    good.write_text("def f(x):\n    return x + 1\n" * 100)
    first = load_blocks([good], tokenizer, 16, cache)
    (meta,) = cache.glob("*.json")
    meta.unlink()  # as if the run died between renaming the ids and their description
    again = load_blocks([good], tokenizer, 16, cache)
    assert len(again) == len(first) and (again.batch([0]) == first.batch([0])).all()
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]


def test_interrupted_command_without_a_handler_of_its_own_says_so(tmp_path, tiny):
    """`inspect` catches no KeyboardInterrupt itself (click turns one into a bare exit 130): the run still ends with
    one line that says it was interrupted, and leaves no report behind."""
    out = tmp_path / "report"
    proc = start_paused("measuring", tmp_path / "paused", "inspect", tiny("gpt2"), "--no-activations", "-o", out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert error_line(proc.returncode, err, "interrupted by SIGINT", "did not finish")
    assert not out.exists()
