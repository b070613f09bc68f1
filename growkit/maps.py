"""Axis maps: what an operator decides for every axis, before any weight is touched.

For each new position of an axis, a map gives the source neuron it copies (`src`, or -1 for a fresh neuron) and the
factor its reader (fan-in) entries are multiplied by. A clone by k is `src = i mod n`, scale 1/k; shrinking is a
subset; sampling from a fitted measure is a random `src` plus whatever the operator adds in its own `adjust` step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from growkit.arch.spec import GROWABLE, HIDDEN, PER_LAYER


@dataclass
class AxisMap:
    """The map of one axis instance from `old` source neurons to `len(src)` new ones.

    `fresh_zero_side` says which side of a fresh neuron is zero so that it contributes nothing at first:
    "out" (rows that write to it: valid where a zero input gives a zero output, e.g. an FFN neuron or the residual
    stream) or "in" (columns that read from it: needed for query heads, whose softmax output is not zero).
    """

    old: int
    src: torch.Tensor
    scale: torch.Tensor | None = None
    fresh_zero_side: Literal["out", "in"] = "out"

    def __post_init__(self) -> None:
        self.src = torch.as_tensor(self.src, dtype=torch.long)
        if self.src.numel() and (int(self.src.max()) >= self.old or int(self.src.min()) < -1):
            raise ValueError(f"axis map source index out of range for an axis of {self.old}")

    @classmethod
    def identity(cls, n: int) -> "AxisMap":
        return cls(n, torch.arange(n))

    @property
    def new(self) -> int:
        return int(self.src.numel())

    @property
    def fresh(self) -> torch.Tensor:
        return self.src < 0

    def is_identity(self) -> bool:
        return self.new == self.old and self.scale is None and bool(torch.equal(self.src, torch.arange(self.old)))

    def multiplicity(self) -> torch.Tensor:
        """How many new positions copy each new position's source (1 for fresh neurons)."""
        counts = torch.bincount(self.src[~self.fresh], minlength=self.old)
        return torch.where(self.fresh, torch.ones_like(self.src), counts[self.src.clamp(min=0)])

    def reader_scale(self) -> torch.Tensor:
        """Multiplier of each new position's reader entries: 1/multiplicity unless the operator chose another."""
        return self.scale if self.scale is not None else 1.0 / self.multiplicity().to(torch.float32)

    def stream_energy_ratio(self) -> float:
        """Mean square of a vector mapped by this axis over the source's, for the uniform maps where it is constant.

        Zero-padded residual streams under RMSNorm need gains times sqrt(ratio) and eps times ratio to stay exact.
        """
        return float((~self.fresh).sum()) / self.new


@dataclass
class GrowthMaps:
    """Every axis map of one growth: the global `hidden`, per-new-layer axes, and the depth map."""

    hidden: AxisMap
    per_layer: dict[tuple[str, int], AxisMap]
    layer_src: list[int]
    identity_layers: set[int] = field(default_factory=set)

    def get(self, kind: str, layer: int | None) -> AxisMap | None:
        """The map of axis `kind` (in new layer `layer`), or None for axes that are never resized."""
        if kind == HIDDEN:
            return self.hidden
        if kind in PER_LAYER and layer is not None:
            return self.per_layer[(kind, layer)]
        assert kind not in GROWABLE or layer is not None, f"per-layer axis {kind} used outside a layer"
        return None
