"""Distributed engines for real: FSDP2 and DeepSpeed ZeRO-2 under torchrun (gloo, CPU) equal one process with the
same global batch, resume exactly from sharded checkpoints and export a model `from_pretrained` loads; requests
that cannot be honoured, and an optimizer built on other tensors, are refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import growkit
from cli_util import error_line, run_cli_batch
from growkit.errors import GrowkitError
from cli_util import torchrun_command
from test_train import ENV, corpus, fresh_checkpoint, losses  # noqa: F401 (corpus: fixture)

# 4 steps of 2 processes x 2 micro-steps x 1 sequence == one process x 2 micro-steps x 2 sequences. Clipping at 0.1
# changes these losses by up to 5e-4 (at 1.0 it would not act), so each engine must clip as one process does.
RUN = ["--steps", "4", "--lr", "2e-3", "--seq-len", "64", "--seed", "1", "--grad-accum", "2", "--save-every", "2",
       "--max-grad-norm", "0.1"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory, corpus) -> Path:  # noqa: F811 (pytest fixture argument)
    d = tmp_path_factory.mktemp("engines")
    src = fresh_checkpoint(d / "small", "llama")
    return growkit.grow(src, d / "grown", width=2, method="clone", noise_snr_db=20, quiet=True).out_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, grown, corpus) -> Path:  # noqa: F811
    """The reference: the same run in one process with the same global batch."""
    out = tmp_path_factory.mktemp("one") / "run"
    growkit.train(grown, corpus["train"], out, steps=4, lr=2e-3, seq_len=64, seed=1, grad_accum=2, batch_size=2,
                  save_every=2, max_grad_norm=0.1, quiet=True)
    return out


def torchrun(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(2, "train", *args), capture_output=True, text=True, env=ENV, timeout=600)


def assert_loads_cleanly(directory: Path) -> None:
    model, info = T.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_fsdp2_matches_one_process_resumes_exactly_and_exports(tmp_path, grown, corpus, one_process):  # noqa: F811
    """The acceptance run: torchrun x2 with FSDP2 on a grown Llama, 4 steps, resumed in the middle."""
    full = tmp_path / "fsdp"
    r = torchrun(grown, "-o", full, "--data", corpus["train"], "--batch-size", "1", "--fsdp", *RUN)
    assert r.returncode == 0, r.stderr[-4000:]
    first = next(line for line in r.stderr.splitlines() if line.startswith("growkit train:"))
    assert first.startswith("growkit train: engine FSDP (FSDP2), world size 2, global batch 4 sequences"), first
    summary = json.loads((full / "training.json").read_text())
    assert (summary["engine"], summary["fsdp_version"], summary["world_size"], summary["global_batch"]) == \
        ("FSDP", 2, 2, 4)
    state = full / "checkpoint-2" / "training_state"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard per rank, no whole copy
        assert sorted(p.name for p in (state / part).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"], part
    assert not list(state.glob("*.safetensors")) and not list(state.glob("*.bin"))
    assert losses(full) == pytest.approx(losses(one_process), abs=2e-5)
    assert max_difference(full, one_process) < 1e-5

    resumed = tmp_path / "resumed"  # the same run, stopped after step 2: resume from its sharded checkpoint
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    r = torchrun(grown, "-o", resumed, "--data", corpus["train"], "--batch-size", "1", "--fsdp", "--resume", *RUN)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    assert losses(resumed) == losses(full)
    assert max_difference(resumed, full) == 0.0
    assert_loads_cleanly(full)
    assert_loads_cleanly(full / "checkpoint-2")


def test_deepspeed_zero2_matches_one_process(tmp_path, grown, corpus, one_process):  # noqa: F811
    """ZeRO-2 over gloo: DeepSpeed accumulates (2 micro-steps), clips and steps; data is sharded per rank."""
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    out = tmp_path / "ds"
    r = torchrun(grown, "-o", out, "--data", corpus["train"], "--batch-size", "1", "--deepspeed", "2", *RUN)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "training.json").read_text())
    assert (summary["engine"], summary["zero_stage"], summary["world_size"], summary["global_batch"]) == \
        ("DEEPSPEED", 2, 2, 4)
    optim = sorted(p.name for p in (out / "checkpoint-2" / "training_state" / "pytorch_model").iterdir())
    assert [n for n in optim if "optim_states" in n] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert losses(out) == pytest.approx(losses(one_process), abs=2e-5)
    assert max_difference(out, one_process) < 1e-5
    assert_loads_cleanly(out)


def test_requests_that_cannot_be_honoured_are_refused(tmp_path, grown, corpus, monkeypatch):  # noqa: F811
    base = [grown, "--data", corpus["train"], "--steps", "4", "--seq-len", "64"]
    cases = {"--fsdp": (["--fsdp"], "--fsdp on CPU needs several processes"),
             "both": (["--fsdp", "--deepspeed", "2"], "choose one engine"),
             "stage": (["--deepspeed", "4"], "ZeRO stage (1, 2 or 3)"),
             "grow": (["--fsdp", "--grow-at", "2:width=2x"], "--grow-at under --fsdp"),
             "clip": (["--max-grad-norm", "-1"], "--max-grad-norm must be a number >= 0")}
    results = run_cli_batch([["train", *base, "-o", tmp_path / name, *extra] for name, (extra, _) in cases.items()])
    for (name, (_, fragment)), r in zip(cases.items(), results):
        assert r.returncode == 2, (name, r.stderr)
        error_line(r.returncode, r.stderr, fragment)
        assert not (tmp_path / name).exists(), name
    launches = {  # what `accelerate launch` leaves in the environment (the CLI reports these as the ones above)
        "fsdp1": ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
        "one-process": ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                        "started one process although --num_processes asked for several"),
        "ds-config": ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
                      "growkit builds the DeepSpeed config")}
    for name, (env, fragment) in launches.items():
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            with pytest.raises(GrowkitError, match=fragment):
                growkit.train(grown, corpus["train"], tmp_path / name, steps=4, seq_len=64, quiet=True)
        assert not (tmp_path / name).exists(), name


def test_an_optimizer_built_on_other_tensors_is_caught_after_prepare():
    from growkit.train.engines import check_prepared
    from growkit.train.loop import make_accelerator

    cfg = T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64)
    model, other = T.LlamaForCausalLM(cfg), T.LlamaForCausalLM(cfg)
    accelerator = make_accelerator()
    cases = {"another model's": (torch.optim.AdamW(other.parameters()), "not parameters of the prepared model"),
             "one missing": (torch.optim.AdamW(list(model.parameters())[1:]), "trainable parameters of the prepared "
                                                                              "model are not in it")}
    for name, (optimizer, fragment) in cases.items():
        prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
        with pytest.raises(GrowkitError, match=fragment):
            check_prepared(accelerator, prepared, prepared_optimizer)
        accelerator.free_memory()
    prepared, prepared_optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    check_prepared(accelerator, prepared, prepared_optimizer)  # the right one passes
    accelerator.free_memory()
