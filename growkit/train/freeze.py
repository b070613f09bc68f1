"""Freezing after growth: train only what growth added (block expansion's recipe) or only what was there before.

"New" entries of a grown tensor are its fresh entries and every copy of a source entry but the first (for a clone
by block tiling, the second block); every entry of a new layer (one whose source layer an earlier layer already
copies) is new. Frozen entries get their gradient masked and their moments zeroed, and are put back after every
optimizer step, because AdamW's decoupled weight decay scales the whole tensor. Whole frozen tensors are treated the
same way rather than by `requires_grad`, so freezing can be put back on a model already wrapped by DDP (on resume)
and AdamW's step counts stay those of an uninterrupted run. The freeze lasts until the next growth.
"""

from __future__ import annotations

from typing import Any

import torch

from growkit.errors import GrowkitError

FREEZE_MODES = ("none", "old", "new")


def new_entries(src: torch.Tensor, new_layer: bool) -> torch.Tensor:
    """Which entries of a grown tensor are new, from each entry's flat source index (-1 where fresh)."""
    if new_layer:
        return torch.ones(src.shape, dtype=torch.bool)
    flat = src.reshape(-1)
    live = flat >= 0
    position = torch.arange(flat.numel())
    first = torch.full((int(flat.max()) + 1 if bool(live.any()) else 1,), flat.numel())
    first.scatter_reduce_(0, flat[live], position[live], "amin")
    return ~(live & (first[flat.clamp(min=0)] == position)).reshape(src.shape)


def new_layers(layer_src: list[int]) -> set[int]:
    """New layers of a depth growth: those whose source layer an earlier layer already copies."""
    return {layer for layer, source in enumerate(layer_src) if source in layer_src[:layer]}


class Freeze:
    """Holds the frozen entries of a grown model in place while its optimizer trains the rest."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, trainable: dict[str, torch.Tensor]) -> None:
        self.kept: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, param in model.named_parameters():
            mask = trainable.get(name)
            if mask is None or bool(mask.all()):
                continue
            mask = mask.to(param.device)
            param.register_hook(lambda grad, mask=mask: grad * mask)
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.mul_(mask)
            self.kept.append((param, mask, param.detach().clone()))
        if self.kept:
            optimizer.register_step_post_hook(self.restore)

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param, mask, kept in self.kept:
            param.copy_(torch.where(mask, param, kept))


class FrozenEntries:
    """The trainable-entry masks of a run's current freeze, saved with its checkpoints (`register_for_checkpointing`)
    so that a resumed run freezes the same entries."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = state["masks"]


def trainable_entries(mode: str, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter, the entries that train under `--freeze mode` ('old': only new ones train; 'new': only old)."""
    if mode not in FREEZE_MODES:
        raise GrowkitError(f"freeze must be one of {', '.join(FREEZE_MODES)}, got {mode!r}")
    if mode == "none":
        return {}
    return {name: mask if mode == "old" else ~mask for name, mask in new.items()}
