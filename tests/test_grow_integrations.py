"""Growth inside other people's loops, run for real on CPU: plain PyTorch, Accelerate, transformers.Trainer.

Each loop grows a noiseless clone 2x in the middle of training with its state carried, so it must continue the
small model's run exactly: the per-step losses and the final model's loss match a run that never grew.
"""

from __future__ import annotations

import torch
import transformers as T

import growkit
from growkit.train.mup import mup_param_groups
from test_grow_state import _batches, _small

GROW_AT, STEPS, REL = 4, 10, 1e-5
MAX_NORM = 0.25  # below every gradient norm of the Trainer run (checked), so its clip is active on every step


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


def _final_loss(model: torch.nn.Module) -> float:
    x = _batches(STEPS + 1)[STEPS]
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def _plain_run(grow: bool) -> tuple[list[float], torch.nn.Module]:
    """The README's plain loop: µP groups, transformers' warm-up schedule, growth between two steps."""
    model = _small("llama-gqa4")
    optimizer = torch.optim.AdamW(mup_param_groups(model, None, lr=3e-3, weight_decay=0.1), lr=3e-3)
    scheduler = T.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=STEPS)
    losses = []
    for step, x in enumerate(_batches(STEPS)):
        if grow and step == GROW_AT:
            grown = growkit.grow_training_state(model, optimizer, scheduler, width="2x")
            model, optimizer, scheduler = grown.model, grown.optimizer, grown.scheduler
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model


def test_plain_loop():
    small_losses, small = _plain_run(grow=False)
    grown_losses, grown = _plain_run(grow=True)
    assert grown.config.hidden_size == 2 * small.config.hidden_size
    assert max(_rel(a, b) for a, b in zip(small_losses, grown_losses)) <= REL
    assert _rel(_final_loss(small), _final_loss(grown)) <= REL


def _accelerate_run(grow: bool, tmp_path) -> tuple[list[float], torch.nn.Module]:
    from accelerate import Accelerator

    from growkit.train.integrations import grow_prepared

    accelerator = Accelerator(cpu=True)
    model = _small("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    losses = []
    for step, x in enumerate(_batches(STEPS)):
        if grow and step == GROW_AT:
            model, optimizer, scheduler = grow_prepared(accelerator, model, optimizer, scheduler, width="2x")
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    if grow:  # the accelerator holds the grown objects only, so save_state saves the grown run
        assert accelerator._models == [model] and accelerator._optimizers == [optimizer]
        accelerator.save_state(str(tmp_path / "state"))
        saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
        wte = accelerator.unwrap_model(model).transformer.wte.weight
        assert any(s["exp_avg"].shape == wte.shape for s in saved["state"].values())
    return losses, accelerator.unwrap_model(model)


def test_accelerate_loop(tmp_path):
    small_losses, small = _accelerate_run(False, tmp_path)
    grown_losses, grown = _accelerate_run(True, tmp_path)
    assert grown.config.n_embd == 2 * small.config.n_embd
    assert max(_rel(a, b) for a, b in zip(small_losses, grown_losses)) <= REL
    assert _rel(_final_loss(small), _final_loss(grown)) <= REL


def _trainer_run(grow: bool, tmp_path) -> tuple[list[float], list[float], torch.nn.Module]:
    from growkit.train.integrations import GrowingTrainer, GrowthCallback

    data = [{"input_ids": x[i], "labels": x[i]} for x in _batches(STEPS) for i in range(4)]
    args = T.TrainingArguments(output_dir=str(tmp_path / f"trainer-{grow}"), max_steps=STEPS, learning_rate=3e-3,
                               per_device_train_batch_size=4, weight_decay=0.1, warmup_steps=3, max_grad_norm=MAX_NORM,
                               logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    callbacks = [GrowthCallback({GROW_AT: dict(width="2x")})] if grow else []
    trainer_class = GrowingTrainer if grow else T.Trainer
    trainer = trainer_class(model=_small("llama-tied"), args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    return [row["loss"] for row in rows], [row["grad_norm"] for row in rows], trainer.model


def test_transformers_trainer(tmp_path):
    small_losses, small_norms, small = _trainer_run(False, tmp_path)
    grown_losses, grown_norms, grown = _trainer_run(True, tmp_path)
    assert len(grown_losses) == STEPS and grown.config.hidden_size == 2 * small.config.hidden_size
    assert min(small_norms) > MAX_NORM  # every step clipped: after growth, in the small model's units
    assert max(_rel(a, b) for a, b in zip(small_norms, grown_norms)) <= REL
    assert max(_rel(a, b) for a, b in zip(small_losses, grown_losses)) <= REL
    assert _rel(_final_loss(small), _final_loss(grown)) <= REL
