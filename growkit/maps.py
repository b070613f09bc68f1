"""Axis maps: what an operator decides for every axis, before any weight is touched.

For each new position of an axis, a map gives the source neuron it copies (`src`, or -1 for a fresh neuron), the
factor its reader (fan-in) entries are multiplied by and, on the residual stream, the factor its writers are
multiplied by (`writer`). A clone by k is `src = i mod n`, reader scale 1/k; shrinking is a subset; a map with
uneven multiplicities stays exact under RMSNorm with `exact_writers()`; `reader_noise` is noise an operator wants on
the copies' readers, cancelling over each neuron's copies; `mixing` makes new neurons combinations of source neurons.
Everything an operator decides is here, so `growkit.apply` is the only place that writes weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from growkit.arch.spec import GROWABLE, HIDDEN, PER_LAYER


@dataclass(frozen=True)
class ReaderNoise:
    """Noise an operator adds to the readers of an axis's copies, made to sum to zero over each neuron's copies.

    `offsets`: each new position's noise as a combination of the source neurons' reader slices, in low-rank form
    `scores @ basis.T` ((new, r) x (old, r)), so the same draw perturbs every reader tensor of the axis coherently.
    `std`: independent noise per entry, by source tensor name, in the stored tensor's units.
    """

    scores: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    std: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Mixing:
    """New neurons that are combinations of source neurons rather than copies of one (rc-sample shrinking with a
    fitted measure): along the axis, new position j is `weights[j] @ source` in every tensor of the axis, and every
    entry of a tensor `name` gets independent noise of std `std[name]` (stored units, before the reader scale)."""

    weights: torch.Tensor  # (new, old)
    std: dict[str, float] = field(default_factory=dict)


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
    #: per-position multiplier of residual writers (embedding column, o_proj/down_proj rows and biases); the hidden
    #: axis's norm gains are divided by it. Applied on RMSNorm families only; None: 1.
    writer: torch.Tensor | None = None
    reader_noise: ReaderNoise | None = None
    #: each new position a combination of source positions (its `src` is then the atom it was drawn around)
    mixing: Mixing | None = None

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

    def multiplicity(self) -> torch.Tensor:
        """How many new positions copy each new position's source (1 for fresh neurons)."""
        counts = torch.bincount(self.src[~self.fresh], minlength=self.old)
        return torch.where(self.fresh, torch.ones_like(self.src), counts[self.src.clamp(min=0)])

    def reader_scale(self) -> torch.Tensor:
        """Multiplier of each new position's reader entries: 1/multiplicity unless the operator chose another."""
        return self.scale if self.scale is not None else 1.0 / self.multiplicity().to(torch.float32)

    def exact_writers(self) -> "AxisMap":
        """This map with the writer scale that keeps an RMS-normalised stream exact: a_i = sqrt(k / m_i), k = new/old.

        Each of the m_i copies of neuron i carries a_i x_i, so the copies' squares sum to k x_i^2, the stream's mean
        square (and so eps) is unchanged, and each copy normalised and multiplied by its gain / a_i equals the source's.
        Fresh (zero-written) positions count in `new` but carry nothing; uniform m_i = k gives a_i = 1 (clone).
        """
        m = self.multiplicity().to(torch.float64)
        a = torch.where(self.fresh, 1.0, (self.new / self.old / m).sqrt()).to(torch.float32)
        return replace(self, writer=None if bool((a == 1).all()) else a)


@dataclass
class GrowthMaps:
    """Every axis map of one growth: the global `hidden`, per-new-layer axes, and the depth map."""

    hidden: AxisMap
    per_layer: dict[tuple[str, int], AxisMap]
    layer_src: list[int]
    identity_layers: set[int] = field(default_factory=set)
    #: a factor on a whole tensor, by source tensor name (subclone's norm-gain correction for dropped coordinates)
    gains: dict[str, float] = field(default_factory=dict)
    #: {tensor name template: the axis instance it has alone}, where one layer holds several instances of a per-layer
    #: axis: a MoE layer's routed experts each have their own `ffn` neurons, kind `ffn[<module>]`
    #: (`growkit.operators.importance.ffn_instances`). Such an instance's maps are in `per_layer` under its kind;
    #: tensors not listed use the axis's own.
    instances: dict[str, str] = field(default_factory=dict)
    #: the instance kind `for_tensor` put in place of its axis
    active: str | None = None

    def for_tensor(self, name: str) -> "GrowthMaps":
        """The maps as tensor template `name` sees them: its own axis instance's in place of the axis's."""
        kind = self.instances.get(name)
        return self if kind is None or kind == self.active else replace(self, active=kind)

    def get(self, kind: str, layer: int | None) -> AxisMap | None:
        """The map of axis `kind` (in new layer `layer`), or None for axes that are never resized."""
        if kind == HIDDEN:
            return self.hidden
        if kind in PER_LAYER and layer is not None:
            if self.active is not None and self.active.startswith(f"{kind}["):
                return self.per_layer[(self.active, layer)]
            return self.per_layer[(kind, layer)]
        assert kind not in GROWABLE or layer is not None, f"per-layer axis {kind} used outside a layer"
        return None
