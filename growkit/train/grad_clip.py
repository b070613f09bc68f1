"""Gradient clipping that continues across growth: every gradient measured in the units of the small model's.

Why: after a `clone` every copy's gradient is t * g[src] (`grow_state`), so the grown model's raw gradient norm is
not the small model's (a hidden-axis writer copied twice counts each entry's square twice at t = 1/2: half the
squared norm). Clipping by the raw norm then scales the step differently from the small model whenever it is active,
and the carried optimizer state no longer continues the small model's trajectory. Summing each copy's square divided
by (copies * t^2) gives back exactly the small model's squared norm, so `grow_state` stores that factor per grown
parameter (in its parameter group, so checkpoints keep it and the next growth multiplies it on) and this clip uses
it: total = sqrt(sum w * g^2), each gradient times min(1, max_norm / (total + 1e-6)), as torch's clip.

Where growth is not an exact continuation the factor is a convention: fresh entries take the mean factor of their
tensor's copied entries, a new layer's tensors their source layer's factor, an untied head the tied tensor's (the
small model's norm summed embedding and head gradients in one tensor; the grown one counts them apart).
"""

from __future__ import annotations

from typing import Any

import torch

#: Parameter-group key holding the clip's factor: a float, or a tensor of one factor per entry where they differ.
NORM_WEIGHT = "grad_norm_weight"


def has_norm_weights(optimizer: Any) -> bool:
    """Whether `optimizer` came out of a growth (so its clip must weigh the gradients)."""
    return any(NORM_WEIGHT in group for group in optimizer.param_groups)


def _squared_norm(grad: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(weight):
        squared = (grad.float().square() * weight.to(grad.device)).sum()
    else:
        squared = torch.linalg.vector_norm(grad, dtype=torch.float32).square() * weight
    return squared.full_tensor() if hasattr(squared, "full_tensor") else squared  # a sharded DTensor's part


@torch.no_grad()
def clip_grown_grad_norm_(optimizer: Any, max_norm: float, accelerator: Any = None) -> torch.Tensor:
    """Clip the gradients of `optimizer`'s parameters to `max_norm` in the small model's units; returns that norm.
    Use it instead of `clip_grad_norm_` after `grow_training_state` (groups without a factor count as 1; with an
    `accelerator`, mixed-precision gradients are unscaled first)."""
    if accelerator is not None:
        accelerator.unscale_gradients()
    grads, total = [], None
    for group in optimizer.param_groups:
        weight = group.get(NORM_WEIGHT, 1.0)
        for param in group["params"]:
            if param.grad is None:
                continue
            grads.append(param.grad)
            squared = _squared_norm(param.grad.detach(), weight)
            total = squared if total is None else total + squared.to(total.device)
    if total is None:
        return torch.zeros(())
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.device, grad.dtype))
    return norm


def clip_grad_norm(accelerator: Any, model: Any, optimizer: Any, max_norm: float) -> Any:
    """The training loop's clip: the accelerator's own, or after a growth the small model's units."""
    if has_norm_weights(optimizer):
        return clip_grown_grad_norm_(optimizer, max_norm, accelerator)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)
