"""Training mixture-of-experts models: the load-balancing loss on, and how many tokens each expert takes.

Why: an upcycled model's experts start identical and its router gets no gradient from the language-model loss
through renormalised top-k weights while its experts are identical, so without the auxiliary (Switch-style load-balancing)
loss nothing moves the router off its initial routing. transformers' MoE models add `router_aux_loss_coef x aux`
to `.loss` when `output_router_logits` is on; this module turns it on and reads the routing off the same forward.
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


def router_loss_setup(model: Any, coef: float | None) -> "ExpertLoad | None":
    """For a MoE model: make its `.loss` include the load-balancing loss (coefficient `coef`, else the config's) and
    return the counter of expert load; None for a dense model (refusing a coefficient it could not use)."""
    if not is_moe(model):
        if coef is not None:
            raise GrowkitError("--router-aux-loss-coef: the model is not a mixture of experts")
        return None
    if coef is not None and not (math.isfinite(coef) and coef >= 0):
        raise GrowkitError(f"--router-aux-loss-coef must be a finite number of at least 0, got {coef}")
    model.config.output_router_logits = True
    if coef is not None:
        model.config.router_aux_loss_coef = coef
        model.router_aux_loss_coef = coef  # the model copied it from its config when it was built
    return ExpertLoad(int(model.config.num_experts_per_tok))


class ExpertLoad:
    """Share of routed (token, slot) choices that went to each expert, summed over layers, and the mean aux loss,
    accumulated over one optimizer step's micro-batches."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.counts: torch.Tensor | None = None
        self.aux: list[float] = []

    @torch.no_grad()
    def add(self, output: Any) -> None:
        for logits in output.router_logits or ():
            chosen = logits.float().topk(self.top_k, dim=-1).indices.reshape(-1)
            counts = torch.bincount(chosen.cpu(), minlength=logits.shape[-1]).double()
            self.counts = counts if self.counts is None else self.counts + counts
        if getattr(output, "aux_loss", None) is not None:
            self.aux.append(float(output.aux_loss))

    def row(self) -> dict[str, Any]:
        """Metrics for the step: `expert_fractions` (one per expert, summing to 1) and `aux_loss`; then reset."""
        fractions = [] if self.counts is None else (self.counts / self.counts.sum()).tolist()
        row = {"expert_fractions": [round(f, 5) for f in fractions],
               "aux_loss": round(sum(self.aux) / len(self.aux), 6) if self.aux else None}
        self.counts, self.aux = None, []
        return row
