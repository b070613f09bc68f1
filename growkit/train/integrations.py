"""Growth inside other people's training loops: Accelerate, and `transformers.Trainer`.

A plain PyTorch loop needs nothing here: call `growkit.grow_training_state` between two steps and use the model,
optimizer and scheduler it returns. Accelerate wraps all three (DDP, `AcceleratedOptimizer`,
`AcceleratedScheduler`) and remembers them for `save_state`; `grow_prepared` grows the inner objects, makes the
accelerator forget the old ones and prepares the new ones. `transformers.Trainer` keeps the model in a local
variable of its training loop, so a callback cannot replace it (transformers issue #38181): `GrowthCallback` says
when, and `GrowingTrainer` (or `GrowingTrainerMixin` on a Trainer subclass of your own) does the swap and makes the
loop's per-step calls use the current model. (With gradient accumulation under DDP, the loop's `no_sync` still names
the old model, so after growth every micro-batch all-reduces: correct, a little slower.)
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from growkit.train.grad_clip import clip_grown_grad_norm_, has_norm_weights
from growkit.train.grow_state import GrownTraining, grow_training_state


def grow_prepared(accelerator: Any, model: Any, optimizer: Any, scheduler: Any = None,
                  **request: Any) -> tuple[Any, Any, Any]:
    """Grow an Accelerate-prepared model, optimizer and (optional) scheduler between two steps; returns the prepared
    replacements. `request`: `grow_training_state`'s options. Every process must call it (growth is deterministic,
    so every rank grows identically)."""
    model, optimizer, scheduler, _ = grow_prepared_run(accelerator, model, optimizer, scheduler, **request)
    return model, optimizer, scheduler


def grow_prepared_run(accelerator: Any, model: Any, optimizer: Any, scheduler: Any = None,
                      **request: Any) -> tuple[Any, Any, Any, GrownTraining]:
    """`grow_prepared`, also returning what `grow_training_state` said (the growth, uneven and frozen entries)."""
    inner_scheduler = getattr(scheduler, "scheduler", scheduler)
    grown = grow_training_state(accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer),
                                inner_scheduler, **request)
    accelerator._models[:] = [m for m in accelerator._models if m is not model]
    accelerator._optimizers[:] = [o for o in accelerator._optimizers if o is not optimizer]
    new_model, new_optimizer = accelerator.prepare(grown.model, grown.optimizer)
    if scheduler is not None and scheduler is not inner_scheduler:  # an AcceleratedScheduler: it checks its optimizers
        scheduler.optimizers = [new_optimizer if o is optimizer else o for o in scheduler.optimizers]
    return new_model, new_optimizer, scheduler, grown


class GrowthCallback(TrainerCallback):
    """Asks a `GrowingTrainer` to grow after given global steps: `GrowthCallback({300: dict(width="2x")})`.

    After a growth it also clears the current model's gradients at each step's end: the loop's own `zero_grad`
    goes to the model it holds locally, the one from before growth.
    """

    def __init__(self, points: dict[int, dict[str, Any]]) -> None:
        self.points = dict(points)
        self.pending: dict[str, Any] | None = None
        self.grown = False

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.grown and model is not None:
            model.zero_grad(set_to_none=True)
        if state.global_step in self.points:
            self.pending = self.points[state.global_step]


class GrowingTrainerMixin:
    """Trainer mix-in that carries out a `GrowthCallback`'s request before the next step's first micro-batch."""

    def grow(self, **request: Any) -> None:
        """Grow now: model, wrapped model, optimizer and scheduler are replaced (state carried, schedule kept)."""
        trainer: Any = self
        model, optimizer, scheduler = grow_prepared(trainer.accelerator, trainer.model_wrapped, trainer.optimizer,
                                                    trainer.lr_scheduler, **request)
        trainer.model_wrapped, trainer.model = model, trainer.accelerator.unwrap_model(model)
        trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
        handler = trainer.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = trainer.model, optimizer, scheduler

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        for callback in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, GrowthCallback) and callback.pending is not None:
                request, callback.pending = callback.pending, None
                self.grow(**request)
                callback.grown = True
        # The loop passes the model it prepared before growth; the current one is ours.
        return super().training_step(self.model_wrapped, inputs, num_items_in_batch)  # type: ignore[misc]

    def _clip_grad_norm(self, model: Any) -> Any:
        trainer: Any = self
        if has_norm_weights(trainer.optimizer):  # grown: clip in the small model's units (grad_clip)
            return clip_grown_grad_norm_(trainer.optimizer, trainer.args.max_grad_norm, trainer.accelerator)
        return super()._clip_grad_norm(self.model_wrapped)  # type: ignore[misc]

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return super()._get_grad_norm(self.model_wrapped, grad_norm=grad_norm)  # type: ignore[misc]


class GrowingTrainer(GrowingTrainerMixin, Trainer):
    """`transformers.Trainer` that grows when a `GrowthCallback` asks."""
