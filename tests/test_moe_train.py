"""Training mixture-of-experts models (growkit.train.moe): the router z-loss, its refusals, and the exported config."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import growkit
from cli_util import assert_nothing_written, error_line, run_cli_batch
from conftest import MODELS
from growkit.train.data import write_stdlib_corpus
from growkit.train.moe import router_loss_setup
from growkit.upcycle import upcycle
from growkit.verify import random_tokens


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An upcycled tiny Llama (E4 top-2, random router) and a little stdlib text to train it on."""
    work = tmp_path_factory.mktemp("moe-train")
    moe_dir = upcycle(MODELS / "tiny-llama", work / "moe", experts=4, top_k=2, quiet=True).out_dir
    return moe_dir, write_stdlib_corpus(work / "train.txt", "train", max_bytes=40_000)


def test_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits(moe_run: tuple[Path, Path]) -> None:
    """The z-loss of a forward, by hand from the same forward's router logits: per layer the mean over tokens of
    log(sum(exp(logits)))^2, averaged over layers; the training loss is `.loss` plus coefficient x that."""
    model = AutoModelForCausalLM.from_pretrained(moe_run[0])
    load = router_loss_setup(model, None, z_coef=0.5)
    assert load is not None
    x = random_tokens(model.config.vocab_size, seed=3, batch=2, length=24)
    output = model(input_ids=x, labels=x, **load.forward_kwargs)
    loss = load.loss(output)
    per_layer = [(torch.log(torch.exp(logits.detach().double()).sum(-1)) ** 2).mean()
                 for logits in output.router_logits]
    assert len(per_layer) == model.config.num_hidden_layers and output.router_logits[0].shape == (48, 4)
    hand = float(sum(per_layer) / len(per_layer))
    assert load.z == [pytest.approx(hand, rel=1e-6)]
    assert float((loss - output.loss).detach()) == pytest.approx(0.5 * hand, rel=1e-5)
    assert load.row()["z_loss"] == pytest.approx(hand, rel=1e-5)


def test_z_loss_shrinks_router_logits_and_the_export_keeps_its_config(moe_run: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """Same seed, same steps, z-loss coefficient 0 and 1: both log `z_loss` every step, equal at step 1 (the same
    first forward), and only the run that optimises it ends with smaller router logsumexps (also in the tracker).
    The exported config keeps the `output_router_logits` the source came with (training asks for router logits in
    its forward, not its config)."""
    moe_dir, text = moe_run
    source_config = json.loads((moe_dir / "config.json").read_text())
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    z = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"z{coef}"
        growkit.train(moe_dir, text, out, steps=4, lr=1e-2, warmup=1, batch_size=2, seq_len=32, quiet=True,
                      router_z_loss_coef=coef, report_to=report_to if coef else "none")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(row["z_loss"] is not None and math.isfinite(row["z_loss"]) for row in rows)
        if coef and report_to == "tensorboard":  # the tracker gets metrics.jsonl's z_loss
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = EventAccumulator(str(out / "runs" / "growkit"), size_guidance={"scalars": 0}).Reload()
            assert {e.step: e.value for e in events.Scalars("train/z_loss")} == pytest.approx(
                {row["step"]: row["z_loss"] for row in rows}, rel=1e-6)
        z[coef] = [row["z_loss"] for row in rows]
        exported = json.loads((out / "config.json").read_text())
        assert exported.get("output_router_logits") == source_config.get("output_router_logits")
        assert json.loads((out / "training.json").read_text())["config"]["router_z_loss_coef"] == coef
    assert z[1.0][0] == z[0.0][0]
    assert z[1.0][-1] < 0.9 * z[0.0][-1], z


def test_router_coefficient_refusals_get_one_line(moe_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A negative or non-finite coefficient, or any on a dense model, is refused before anything is written."""
    moe_dir, text = moe_run
    dense = MODELS / "tiny-llama"
    cases = [(moe_dir, "--router-z-loss-coef", "-1", "--router-z-loss-coef must be a finite number of at least 0, "
              "got -1.0"),
             (moe_dir, "--router-z-loss-coef", "nan", "--router-z-loss-coef must be a finite number of at least 0, "
              "got nan"),
             (moe_dir, "--router-aux-loss-coef", "-1", "--router-aux-loss-coef must be a finite number of at least "
              "0, got -1.0"),
             (dense, "--router-z-loss-coef", "0.1", "--router-z-loss-coef: the model is not a mixture of experts"),
             (dense, "--router-aux-loss-coef", "0.1", "--router-aux-loss-coef: the model is not a mixture of experts")]
    runs = run_cli_batch([["train", src, "--data", text, "-o", tmp_path / f"out{i}", "--steps", "1", option, value]
                          for i, (src, option, value, _) in enumerate(cases)])
    for i, ((*_, message), run) in enumerate(zip(cases, runs)):
        assert run.returncode == 2, run.stderr
        assert error_line(run.returncode, run.stderr, message)
        assert_nothing_written(tmp_path / f"out{i}")
