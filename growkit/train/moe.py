"""Training mixture-of-experts models: the load-balancing loss on, the router z-loss optional, and how many tokens
each expert takes.

Why: an upcycled model's experts start identical and its router gets no gradient from the language-model loss
through renormalised top-k weights while its experts are identical, so without the auxiliary (Switch-style load-balancing)
loss nothing moves the router off its initial routing. transformers' MoE models add `router_aux_loss_coef x aux`
to `.loss` when asked for `output_router_logits` (passed to the training forward, so the config the model is
exported with keeps its own value); the z-loss (ST-MoE), which keeps router logits small, they do not compute: it is
computed here from the same forward's router logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from growkit.errors import GrowkitError


def is_moe(model: Any) -> bool:
    return getattr(model.config, "num_experts_per_tok", None) is not None


def lm_loss_only(model: Any) -> dict[str, bool]:
    """Forward keyword arguments that leave the auxiliary loss out of `.loss` (evaluation compares language-model
    losses); none for a dense model, whose forward does not know the argument."""
    return {"output_router_logits": False} if is_moe(getattr(model, "module", model)) else {}


def check_router_options(moe: bool, coef: float | None, z_coef: float) -> None:
    """Refuse router-loss coefficients a model cannot use (`moe`: whether it is a mixture of experts) or that are
    no finite number of at least 0 (`train` checks this on the config, before anything is written)."""
    if not moe:
        if coef is not None:
            raise GrowkitError("--router-aux-loss-coef: the model is not a mixture of experts")
        if z_coef:
            raise GrowkitError("--router-z-loss-coef: the model is not a mixture of experts")
    if coef is not None and not (math.isfinite(coef) and coef >= 0):
        raise GrowkitError(f"--router-aux-loss-coef must be a finite number of at least 0, got {coef}")
    if not (math.isfinite(z_coef) and z_coef >= 0):
        raise GrowkitError(f"--router-z-loss-coef must be a finite number of at least 0, got {z_coef}")


def router_loss_setup(model: Any, coef: float | None, z_coef: float = 0.0) -> "ExpertLoad | None":
    """For a MoE model: set the load-balancing loss's coefficient (`coef`, else the config's) and return the counter
    of expert load, whose `forward_kwargs` make the training forward's `.loss` include that loss and whose `loss` adds
    `z_coef` x the router z-loss; None for a dense model (refusing coefficients it could not use)."""
    check_router_options(is_moe(model), coef, z_coef)
    if not is_moe(model):
        return None
    if coef is not None:
        model.config.router_aux_loss_coef = coef
        model.router_aux_loss_coef = coef  # the model copied it from its config when it was built
    return ExpertLoad(int(model.config.num_experts_per_tok), z_coef)


def router_z_loss(router_logits: Any) -> torch.Tensor:
    """ST-MoE's router z-loss: per MoE layer the mean over tokens of logsumexp(router logits)^2, averaged over the
    layers."""
    per_layer = [torch.logsumexp(logits.float(), dim=-1).square().mean() for logits in router_logits]
    return torch.stack(per_layer).mean()


class ExpertLoad:
    """Share of routed (token, slot) choices that went to each expert, summed over layers, and the mean aux and z
    losses, accumulated over one optimizer step's micro-batches."""

    #: the training forward's keyword arguments: router logits (and the aux loss in `.loss`)
    forward_kwargs = {"output_router_logits": True}

    def __init__(self, top_k: int, z_coef: float = 0.0) -> None:
        self.top_k = top_k
        self.z_coef = z_coef
        self.counts: torch.Tensor | None = None
        self.aux: list[float] = []
        self.z: list[float] = []

    def loss(self, output: Any) -> torch.Tensor:
        """The loss to optimise: `.loss` (language model + aux) plus z_coef x the z-loss, which is recorded."""
        z = router_z_loss(output.router_logits)
        self.z.append(float(z.detach()))
        return output.loss + self.z_coef * z if self.z_coef else output.loss

    @torch.no_grad()
    def add(self, output: Any) -> None:
        for logits in output.router_logits or ():
            chosen = logits.float().topk(self.top_k, dim=-1).indices.reshape(-1)
            counts = torch.bincount(chosen.cpu(), minlength=logits.shape[-1]).double()
            self.counts = counts if self.counts is None else self.counts + counts
        if getattr(output, "aux_loss", None) is not None:
            self.aux.append(float(output.aux_loss))

    def row(self, accelerator: Any = None) -> dict[str, Any]:
        """Metrics for the step: `expert_fractions` (one per expert, summing to 1), `aux_loss` and `z_loss`; then
        reset. With several processes (`accelerator`), the counts are summed and the losses averaged over all of
        them (every process must call this), so the row is the global one."""
        counts = self.counts if self.counts is not None else torch.zeros(0, dtype=torch.float64)
        sums = torch.tensor([sum(self.aux), len(self.aux), sum(self.z), len(self.z)], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            both = accelerator.reduce(torch.cat([counts, sums]).to(accelerator.device), reduction="sum").cpu()
            counts, sums = both[:-4], both[-4:]
        aux_sum, aux_n, z_sum, z_n = sums.tolist()
        row = {"expert_fractions": [round(f, 5) for f in (counts / counts.sum()).tolist()] if counts.numel() else [],
               "aux_loss": round(aux_sum / aux_n, 6) if aux_n else None,
               "z_loss": round(z_sum / z_n, 6) if z_n else None}
        self.counts, self.aux, self.z = None, [], []
        return row
