"""The operator interface: an operator turns a plan into axis maps; it never touches tensors by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from growkit.arch.spec import HIDDEN, PER_LAYER, QGROUP, Family, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap, GrowthMaps
from growkit.operators.depth import depth_map
from growkit.plan import GrowthPlan


@dataclass
class Candidates:
    """Maps an operator cannot choose between without running them (subclone's rescale="auto"): the pipeline builds
    each one's model in memory, keeps the one with the lowest next-token loss on the `heldout` token blocks and tells
    the operator which (`Operator.chosen`)."""

    maps: dict[str, GrowthMaps]
    heldout: torch.Tensor


class Operator:
    """Base class: build maps axis by axis; subclasses that need the weights (importance, fitted measures) override
    `build_maps`. Everything an operator decides is in its maps: `growkit.apply` writes every weight."""

    name: str = ""
    directions: tuple[str, ...] = ("grow",)
    #: growing keeps the function exactly, wherever the family declares no limit on it (`growkit.arch.spec.Limit`)
    exact: bool = False

    def settings(self) -> dict[str, Any]:
        """The operator's resolved options (defaults included), recorded in provenance."""
        return {}

    def check(self, plan: GrowthPlan) -> None:
        """Raise GrowkitError for a plan this operator cannot carry out (before any tensor is read)."""
        if plan.direction not in self.directions:
            raise GrowkitError(f"--method {self.name} cannot {plan.direction} a model")
        _check_query_groups(plan)

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        raise NotImplementedError

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps | Candidates:
        gen = torch.Generator().manual_seed(seed)
        layer_src, identity = depth_map(plan.depth_method, plan.source.layers, plan.target.layers)
        hidden = self.axis_map("hidden", plan.source.hidden, plan.target.hidden, gen)
        per_layer = {
            (kind, layer): self.axis_map(kind, plan.source.axis(kind), plan.target.axis(kind), gen)
            for layer in range(plan.target.layers) for kind in PER_LAYER
        }
        return GrowthMaps(hidden=hidden, per_layer=per_layer, layer_src=layer_src, identity_layers=identity)

    def chosen(self, name: str, losses: dict[str, float]) -> None:
        """Told which of the `Candidates` it offered the pipeline kept, and each candidate's held-out loss."""


def stream_exact(kind: str, m: AxisMap) -> AxisMap:
    """A growth map of the residual stream (`hidden`) gets the writer scale that keeps RMSNorm exact at any
    multiplicity (`AxisMap.exact_writers`); maps of other axes are returned as they are (their readers' 1/m is
    already exact inside a block)."""
    return m.exact_writers() if kind == HIDDEN else m


def fresh_side(kind: str) -> str:
    """Which side of a fresh neuron stays zero: query heads read a softmax that is not zero, so their readers are."""
    return "in" if kind == QGROUP else "out"


def _check_query_groups(plan: GrowthPlan) -> None:
    """Heads are kv_heads x qgroup (query heads per kv head), and axis maps act on each factor alone, so a growth
    (which must keep the function) keeps every query group whole: more kv heads with the same heads would split groups, which no map on these
    factors can do exactly (each new kv head would need its own share of the group's query heads)."""
    old, new = plan.source.qgroup, plan.target.qgroup
    if plan.direction == "grow" and new < old:
        raise GrowkitError(
            f"kv heads {plan.source.kv_heads} -> {plan.target.kv_heads} with {plan.target.heads} heads would split "
            f"each group of {old} query heads sharing a kv head into groups of {new}; growkit keeps GQA groups whole: "
            f"give --heads {plan.target.kv_heads * old} (or more) with --kv-heads {plan.target.kv_heads}")
