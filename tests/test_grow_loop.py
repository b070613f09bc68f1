"""`growkit train --grow-at`: growth points inside one run; resume before, at and after them; DDP."""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

import growkit
from growkit.errors import GrowkitError
from cli_util import torchrun_command
from test_train import ENV, _cli, corpus, fresh_checkpoint, losses  # noqa: F401 (corpus: fixture)

GROW = ["4:width=2x,untie-head=yes,freeze=old", "8:layers=2x,depth-method=identity"]
# max_grad_norm: every step clipped, so a resumed run must also restore the clip's factors after a growth.
KW = dict(steps=11, lr=2e-3, batch_size=4, seq_len=64, grad_accum=2, warmup=2, quiet=True, seed=3, grow_at=GROW,
          max_grad_norm=1e-3)


def _weights_gap(a, b) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_grow_at_resume_before_at_and_after_a_growth_point_equals_one_run(tmp_path, corpus):
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    whole = growkit.train(ckpt, corpus["train"], tmp_path / "a", **KW)
    summary = json.loads((tmp_path / "a" / "training.json").read_text())
    assert [g["step"] for g in summary["growths"]] == [4, 8]
    assert whole.model.config.n_embd == 64 and whole.model.config.n_layer == 4
    assert not whole.model.config.tie_word_embeddings
    assert [r["step"] for r in whole.history] == list(range(1, 12))
    # Stop at 3 (before the first point), 4 (its checkpoint is from before growing), 6 (after it), 9 (after both).
    for stop, at in ((3, 3), (1, 4), (2, 6), (3, 9)):
        part = growkit.train(ckpt, corpus["train"], tmp_path / "b", stop_after=stop, resume=at > 3, **KW)
        assert part.steps == at and (tmp_path / "b" / f"checkpoint-{at}").is_dir()
    growkit.train(ckpt, corpus["train"], tmp_path / "b", resume=True, **KW)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)
    assert _weights_gap(tmp_path / "a", tmp_path / "b") < 1e-6


def test_grow_at_noiseless_clone_with_clipping_continues_the_small_run(tmp_path, corpus):
    # max_grad_norm far below any gradient norm here: every step is clipped, after growth in the small model's units.
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "llama")
    kw = {**KW, "grad_accum": 1, "steps": 8, "max_grad_norm": 1e-3}
    small = growkit.train(ckpt, corpus["train"], tmp_path / "small", **{**kw, "grow_at": []})
    grown = growkit.train(ckpt, corpus["train"], tmp_path / "grown", **{**kw, "grow_at": ["3:width=2x,noise=none"]})
    assert grown.model.config.hidden_size == 2 * small.model.config.hidden_size
    assert losses(tmp_path / "grown") == pytest.approx(losses(tmp_path / "small"), rel=1e-5)


@pytest.mark.parametrize("grow_at, message", [
    (["300"], "expected STEP:KEY=VALUE"),
    (["3:wdth=2x"], "'wdth=2x' is not KEY=VALUE"),
    (["3:hidden=big"], "hidden needs a number"),
    (["3:untie-head=maybe"], "untie-head needs yes or no"),
    (["3:freeze=all"], "freeze needs one of none, old, new"),
    (["11:width=2x"], r"step must be in \[0, 11\)"),
    (["3:width=1.5x"], "needs integer ratios"),
    (["3:width=2x", "3:layers=2x"], "two growth points at step 3"),
])
def test_bad_grow_at_fails_before_training(tmp_path, corpus, grow_at, message):
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    with pytest.raises(GrowkitError, match=message):
        growkit.train(ckpt, corpus["train"], tmp_path / "out", **{**KW, "grow_at": grow_at})
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_grow_at_cli_bad_spec_is_one_line(tmp_path, corpus):
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    r = _cli("train", str(ckpt), "-d", str(corpus["train"]), "-o", str(tmp_path / "out"), "--steps", "5",
             "--grow-at", "2:width=2x", "--grow-at", "nonsense")
    assert r.returncode == 2 and "--grow-at 'nonsense'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_two_processes_grow_identically_and_match_one_process(tmp_path, corpus):
    """torchrun x2 (gloo, CPU) growing at step 3 == one process with the same global batch."""
    src = fresh_checkpoint(tmp_path / "small", "llama")
    args = ["--data", str(corpus["train"]), "--steps", "6", "--lr", "2e-3", "--seq-len", "64", "--seed", "1", "-q",
            "--grow-at", "3:width=2x,noise=20"]
    r = subprocess.run(torchrun_command(2, "train", src, "-o", tmp_path / "ddp", "--batch-size", "2", *args),
                       capture_output=True, text=True, env=ENV, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "training.json").read_text())
    assert summary["processes"] == 2 and summary["growths"][0]["step"] == 3
    # The reference runs in this process: the process boundary is the two-process run's, and a CLI run of growth
    # points is checked by test_grow_at_cli_bad_spec_is_one_line and by the torchrun above.
    growkit.train(src, corpus["train"], tmp_path / "one", batch_size=4, steps=6, lr=2e-3, seq_len=64, seed=1,
                  grow_at=["3:width=2x,noise=20"], quiet=True)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=2e-5)
    assert _weights_gap(tmp_path / "ddp", tmp_path / "one") < 1e-4
