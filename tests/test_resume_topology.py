"""`--resume` against what a checkpoint was saved with, and Ctrl-C / SIGTERM on one process of a torchrun job.

The signal is sent at an exact point (GROWKIT_TEST_PAUSE: every rank waits after its checkpoint until told), to one
rank only; the other rank is then let go, so it would run into the next step's collectives alone if nothing told it
to stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import growkit
from cli_util import start_torchrun_paused
from growkit.errors import GrowkitError
from growkit.train.loop import TrainConfig, lr_lambda
from test_train import corpus, fresh_checkpoint, losses  # noqa: F401 - corpus is a fixture

ARGS = ["--steps", "6", "--save-every", "2", "--lr", "2e-3", "--seq-len", "32", "--seed", "1", "-q"]


def test_sigterm_on_one_rank_stops_both_and_the_checkpoint_resumes_on_one_process(tmp_path, corpus, capfd):
    ckpt = fresh_checkpoint(tmp_path / "ckpt", "gpt2")
    out = tmp_path / "ddp"
    marker = tmp_path / "paused"
    proc, pids = start_torchrun_paused("checkpoint-saved", marker, 2, "train", ckpt, "-d", corpus["train"], "-o", out,
                                       "--batch-size", "2", *ARGS)
    sent = time.monotonic()
    os.kill(pids[1], signal.SIGTERM)  # rank 1 only, not rank 0 (which prints and saves) nor torchrun
    Path(f"{marker}.rank0").unlink()  # rank 0 goes on to step 3 as if nothing had happened
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30, err
    assert proc.returncode != 0, err
    ours = {line for line in err.splitlines() if line.startswith("error:")}
    assert ours == {f"error: {out}: training interrupted by SIGTERM on rank 1; checkpoints saved so far are kept "
                    "(continue with --resume), the final model was not written"}, err
    # The only traceback is torchrun's own report of the ranks' exit status, which no worker can prevent.
    assert err.count("Traceback") == 1 and "ChildFailedError" in err.split("Traceback")[1], err
    # Both stopped before step 3's checkpoint; checkpoint-2 is whole and nothing half-written is left.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["processes"] == 2

    # One process with the same global batch: refused without the flag (the world size changed) ...
    one = dict(steps=6, save_every=2, lr=2e-3, seq_len=32, seed=1, batch_size=4, quiet=True)
    with pytest.raises(GrowkitError, match=r"^--resume: checkpoint-2 was saved with 2 processes \(now 1\); "
                                           r"resume with the same, or pass --allow-changed-topology") as refused:
        growkit.train(ckpt, corpus["train"], out, resume=True, **one)
    assert "\n" not in str(refused.value)
    # ... and with it, the run continues exactly as an uninterrupted one-process run with that global batch.
    capfd.readouterr()
    growkit.train(ckpt, corpus["train"], out, resume=True, allow_changed_topology=True, **one)
    assert "global batch 4 as before: the data stream is unchanged" in capfd.readouterr().err
    growkit.train(ckpt, corpus["train"], tmp_path / "one", **one)
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), abs=2e-5)
    wa, wb = load_file(out / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


KW = dict(lr=1e-12, batch_size=2, seq_len=32, warmup=2, weight_decay=0.0, quiet=True, seed=5, save_every=2)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus):
    """A one-process run of 8 steps stopped after its checkpoint at step 2 (lr ~ 0: each loss names its batch)."""
    tmp = tmp_path_factory.mktemp("stopped")
    ckpt = fresh_checkpoint(tmp / "ckpt", "gpt2")
    growkit.train(ckpt, corpus["train"], tmp / "run", steps=8, stop_after=2, **KW)
    return ckpt, tmp / "run"


@pytest.fixture
def stopped_at_2(stopped_run, tmp_path):
    """A copy of `stopped_run` of this test's own, to resume."""
    ckpt, run = stopped_run
    shutil.copytree(run, tmp_path / "run")
    return ckpt, tmp_path / "run"


@pytest.mark.parametrize("change, match", [
    ({"steps": 12}, r"--resume: checkpoint-2 was saved with --steps 8 \(now 12\); resume with the same, or pass "
                    r"--allow-changed-topology to go on \(the run then says how"),
    ({"batch_size": 4}, r"checkpoint-2 was saved with global batch 2 \(now 4\); "),
    ({"grad_accum": 2, "steps": 9}, r"checkpoint-2 was saved with global batch 2 \(now 4\), --steps 8 \(now 9\); "),
], ids=["steps", "batch-size", "grad-accum-and-steps"])
def test_resume_refuses_a_changed_global_batch_or_step_count(stopped_at_2, corpus, change, match):
    ckpt, out = stopped_at_2
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(GrowkitError, match=match):
        growkit.train(ckpt, corpus["train"], out, resume=True, **{**KW, "steps": 8, **change})
    assert sorted(p.name for p in out.iterdir()) == before


def test_another_split_of_the_same_global_batch_needs_no_flag(stopped_at_2, corpus, tmp_path, capfd):
    ckpt, out = stopped_at_2
    capfd.readouterr()
    resumed = growkit.train(ckpt, corpus["train"], out, resume=True, **{**KW, "steps": 8, "batch_size": 1,
                                                                        "grad_accum": 2}).history
    assert "--batch-size 1 --grad-accum 2 (was 2, 1): the same global batch 2" in capfd.readouterr().err
    whole = growkit.train(ckpt, corpus["train"], tmp_path / "whole", **{**KW, "steps": 8}).history
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole[2:]], abs=1e-5)


def test_allowed_topology_change_does_what_it_says(stopped_at_2, corpus, tmp_path, capfd):
    """--allow-changed-topology with a doubled global batch and a longer schedule: step 3 reads the blocks a fresh
    run with the new batch reads at step 3 (skipping those in between, as announced) and takes the new schedule's LR."""
    ckpt, out = stopped_at_2
    new = {**KW, "steps": 12, "batch_size": 4}
    capfd.readouterr()
    resumed = growkit.train(ckpt, corpus["train"], out, resume=True, allow_changed_topology=True, **new).history
    err = capfd.readouterr().err
    assert ("global batch 2 -> 4: step 3 reads stream positions 8..11, the checkpointed run had read up to 3: "
            "it skips 4 blocks") in err, err
    f = lr_lambda(TrainConfig(steps=12, warmup=2))
    assert f"the LR follows the cosine schedule of 12 steps from step 3 on: x{f(2):.4g} of --lr there" in err, err
    fresh = growkit.train(ckpt, corpus["train"], tmp_path / "fresh", **new).history
    assert [r["step"] for r in resumed] == list(range(3, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in fresh[2:]], abs=1e-5)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in fresh[2:]], rel=1e-9)
    assert len({round(r["loss"], 4) for r in fresh}) > 5  # the batches do differ, so the match above means something


def test_resume_cannot_end_before_its_checkpoint(stopped_at_2, corpus):
    ckpt, out = stopped_at_2
    with pytest.raises(GrowkitError, match="--steps 2 is not past checkpoint-2's step 2; nothing to train"):
        growkit.train(ckpt, corpus["train"], out, resume=True, allow_changed_topology=True, **{**KW, "steps": 2})
