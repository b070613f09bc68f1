"""`--report-to`: what the trackers record, read back from their own files, equals metrics.jsonl.

TensorBoard's event files are read with tensorboard's EventAccumulator; a W&B offline run's `.wandb` file is read
record by record (its framing below, its records with wandb's own protobuf classes). The gradient norm is checked
against one computed here from the first batch, and a growth point (`--grow-at`) is among the logged events.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

import growkit
from cli_util import cli_env, error_line, run_cli
from growkit.train.blocks import BlockSampler, load_blocks
from test_train import corpus, fresh_checkpoint  # noqa: F401 - corpus is a fixture

RUN = dict(steps=4, lr=1e-2, warmup=1, batch_size=2, seq_len=32, eval_every=2, base_width=16, seed=3,
           grow_at=["2:width=2x"], quiet=True)


def train_with(tracker: str, tmp_path: Path, corpus: dict[str, Path]) -> tuple[Path, list[dict]]:
    ckpt = fresh_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
    growkit.train(ckpt, corpus["train"], out, eval_data=corpus["val"], report_to=tracker, **RUN)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    return out, rows


def expected(rows: list[dict], out: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, from metrics.jsonl and training.json (the growth)."""
    want: dict[str, dict[int, float]] = {}
    for r in rows:
        scalars = {"train/loss": r["loss"], "train/learning_rate": r["lr"], "train/grad_norm": r["grad_norm"],
                   "train/tokens_per_s": r["tokens_per_s"], "train/epoch": r["epoch"], "eval/loss": r["eval_loss"],
                   **{f"train/lr/{k}": v for k, v in r["lrs"].items()}}
        for tag, value in scalars.items():
            if value is not None:
                want.setdefault(tag, {})[r["step"]] = value
    (growth,) = json.loads((out / "training.json").read_text())["growths"]
    want["growth/parameters"] = {growth["step"]: growth["parameters"][1]}
    return want


def first_step_grad_norm(out: Path, ckpt: Path, data: Path) -> float:
    """The gradient norm of step 1 computed here: the checkpoint's loss on the run's first batch."""
    tokenizer = T.AutoTokenizer.from_pretrained(ckpt)
    blocks = load_blocks([data], tokenizer, RUN["seq_len"], out / ".data-cache")
    x = blocks.batch(BlockSampler(len(blocks), RUN["seed"]).micro_batch(0, 0, 0, 1, 1, RUN["batch_size"]))
    model = T.AutoModelForCausalLM.from_pretrained(ckpt)
    model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss.backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_tensorboard_event_files_hold_the_metrics(tmp_path, corpus):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = train_with("tensorboard", tmp_path, corpus)
    events = EventAccumulator(str(out / "runs" / "growkit"), size_guidance={"scalars": 0}).Reload()
    want = expected(rows, out)
    assert set(events.Tags()["scalars"]) == set(want)
    for tag, values in want.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(values, rel=1e-6), tag  # event files hold float32
    assert set(want["eval/loss"]) == {2, 4} and len(want["train/lr/x1"]) == 4
    assert {"train/lr/x0.5", "train/lr/x0.25"} <= set(want)  # the µP group's LR, halved again by the growth
    assert rows[0]["grad_norm"] == pytest.approx(first_step_grad_norm(out, tmp_path / "ckpt", corpus["train"]),
                                                 rel=1e-5)
    assert all(r["grad_norm"] > 1.0 for r in rows)  # above --max-grad-norm 1: the norm before clipping


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path, corpus):
    """A run killed after logging step 3 but before checkpointing it resumes from checkpoint-2 and logs step 3 again:
    the event files hide the first run's step 3 (TensorBoard's purge at the resume step), as metrics.jsonl drops it."""
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, out = fresh_checkpoint(tmp_path / "ckpt"), tmp_path / "run"
    run = dict(RUN, grow_at=None, save_every=2, report_to="tensorboard")
    growkit.train(ckpt, corpus["train"], out, stop_after=3, **run)
    shutil.rmtree(out / "checkpoint-3")  # the kill came before step 3's checkpoint
    growkit.train(ckpt, corpus["train"], out, resume=True, **run)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "runs" / "growkit"), size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def wandb_records(path: Path):
    """The records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte head (crc32c, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk head is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_metrics(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb", reason="--report-to wandb needs the wandb package")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, rows = train_with("wandb", tmp_path, corpus)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, dict[int, float]] = {}
    texts, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for tag, value in items.items():
                if isinstance(value, str):
                    texts[tag] = (items["_step"], value)
                elif not tag.startswith("_"):
                    logged.setdefault(tag, {})[items["_step"]] = value
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    assert logged == expected(rows, out)  # W&B keeps the float64 values: equal, not close
    assert texts == {"growth/spec": (2, "2:width=2x")}
    assert config["steps"] == 4 and config["report_to"] == "wandb" and config["grow_at"] == '["2:width=2x"]'


def test_a_tracker_that_does_not_start_is_one_line_and_trains_nothing(tmp_path, corpus):
    """W&B online without an API key (and no netrc or settings to find one in) refuses to start. In a process of its
    own: wandb keeps its first run's settings (another test's offline mode) for the rest of a process."""
    import subprocess
    import sys

    pytest.importorskip("wandb", reason="--report-to wandb needs the wandb package")
    from growkit.train.loop import LEFT_BY_A_FAILED_START

    (tmp_path / "netrc").write_text("")
    env = cli_env(WANDB_MODE="online", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), NETRC=str(tmp_path / "netrc"))
    env.pop("WANDB_API_KEY", None)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "growkit.cli", "train", str(fresh_checkpoint(tmp_path / "ckpt")), "-d",
                        str(corpus["train"]), "-o", str(out), "--steps", "2", "--seq-len", "32", "--report-to", "wandb",
                        "-q"], capture_output=True, text=True, timeout=240, env=env)
    error_line(r.returncode, r.stderr, "error: --report-to wandb: the tracker did not start (UsageError: No API key "
               "configured.", "); nothing was trained")
    assert r.returncode == 2
    assert {p.name for p in out.iterdir()} <= LEFT_BY_A_FAILED_START  # a new run may start there


def refused_before_training(tmp_path: Path, corpus: dict[str, Path], name: str, message: str) -> None:
    ckpt = fresh_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    r = run_cli("train", ckpt, "-d", corpus["train"], "-o", out, "--steps", "2", "--report-to", name)
    assert error_line(r.returncode, r.stderr, message) and r.returncode == 2
    assert not out.exists()


def test_unknown_tracker_is_one_line_before_training(tmp_path, corpus):
    refused_before_training(tmp_path, corpus, "tensorbord",
                            "--report-to must be one of none, tensorboard, wandb, trackio, mlflow, got 'tensorbord'")


def test_tracker_without_its_package_is_one_line_before_training(tmp_path, corpus):
    from accelerate.utils import is_mlflow_available, is_trackio_available

    missing = [name for name, present in (("trackio", is_trackio_available()), ("mlflow", is_mlflow_available()))
               if not present]
    if not missing:
        pytest.skip("trackio and mlflow are both installed here: no tracker without its package to ask for")
    refused_before_training(tmp_path, corpus, missing[0],
                            f"--report-to {missing[0]}: the {missing[0]} package is not installed (pip install "
                            f"{missing[0]}, or growkit[trackers]); nothing was trained")


def test_accelerate_start_up_errors_are_not_blamed_on_mixed_precision(tmp_path, corpus):
    """A bad ACCELERATE_* setting used to read `--mixed-precision no is not available here`."""
    import subprocess
    import sys

    ckpt = fresh_checkpoint(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "growkit.cli", "train", str(ckpt), "-d", str(corpus["train"]), "-o",
                        str(tmp_path / "out"), "--steps", "2"], capture_output=True, text=True, timeout=240,
                       env=cli_env(ACCELERATE_DYNAMO_BACKEND="nonsense"))
    line = error_line(r.returncode, r.stderr, "accelerate cannot set up this process", "ValueError",
                      "'NONSENSE' is not a valid DynamoBackend")
    assert "precision" not in line and r.returncode == 2


def test_recipe_refuses_a_bad_tracker_before_growing(tmp_path):
    from growkit.errors import GrowkitError
    from growkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("grow: {width: 2}\ntrain: {data: [x.txt], report_to: tensorbord}\n")
    with pytest.raises(GrowkitError, match=r"^.*/r\.yaml: train\.report_to: --report-to must be one of none, "
                                           r"tensorboard, wandb, trackio, mlflow, got 'tensorbord'$"):
        load_recipe(path)
