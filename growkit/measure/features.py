"""Neuron features: every weight attached to one neuron of an axis, across all tensors that touch the axis.

A neuron of `hidden` owns a column of the embedding, one entry of every norm gain and bias on the residual stream,
a row of every matrix that writes to the stream and a column of every matrix that reads from it. A neuron of a
product dimension (a head in q_proj's kv_heads x qgroup x head_dim) owns its whole block. Values are in mean-field
units: every matrix with a fan-in is multiplied by that fan-in, so a cloned model has exactly the same features as
its source and models of different widths are comparable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from growkit.arch.sections import has_sections, plain_parts
from growkit.arch.spec import GROWABLE, PER_LAYER, Sizes, TensorSpec
from growkit.checkpoint.reader import Checkpoint

#: (axis kind, layer); the layer is None for the network-wide `hidden` axis.
AxisKey = tuple[str, Optional[int]]


def axis_key(kind: str, layer: int | None) -> AxisKey:
    """The key of the axis instance that `kind` denotes inside `layer` (hidden is shared by every layer)."""
    return (kind, layer if kind in PER_LAYER else None)


def key_label(key: AxisKey) -> str:
    kind, layer = key
    return kind if layer is None else f"{kind}@{layer}"


def fan_in(spec: TensorSpec, sizes: Sizes, tied: bool = False) -> int:
    """Size of the tensor's reader (input) dimension; 1 for embeddings, norms and biases.

    With a tied head, the final norm carries the head's fan-in correction (growth divides its gain, not the
    embedding), so its fan-in is the hidden size.
    """
    if tied and spec.final_norm:
        return sizes.hidden
    for dim, n in zip(spec.dims, sizes.shape(spec)):
        if dim.role == "in":
            return n
    return 1


def unit_factor(spec: TensorSpec, sizes: Sizes, units: str = "mf", tied: bool = False) -> float:
    """Multiplier that puts a tensor in the given units: mean-field (x fan-in), standard (x sqrt(fan-in)) or raw."""
    f = fan_in(spec, sizes, tied)
    if units == "mf":
        return float(f)
    if units == "sp":
        return float(f) ** 0.5
    if units == "raw":
        return 1.0
    raise ValueError(f"unknown units {units!r}; choose mf, sp or raw")


def axis_features(x: torch.Tensor, spec: TensorSpec, sizes: Sizes, kind: str) -> torch.Tensor | None:
    """`(neurons, d)`: one row per neuron of axis `kind` in tensor `x`, or None if the tensor does not touch it.

    The dimension holding the axis is split into its factors and the axis factor moved to the front, so a neuron
    of a product dimension keeps its whole block (e.g. all head_dim rows of a head, for every query in its group);
    a dim made of sections gives each neuron its rows in every section that spans the axis, side by side.
    """
    if has_sections(spec):
        rows = [f for part, piece in plain_parts(x, spec, sizes) if (f := axis_features(piece, part, sizes, kind))
                is not None]
        return torch.cat(rows, 1) if rows else None
    for i, dim in enumerate(spec.dims):
        if kind in dim.axes:
            factors = sizes.factors(dim)
            k = dim.axes.index(kind)
            y = x.reshape(list(x.shape[:i]) + factors + list(x.shape[i + 1:])).movedim(i + k, 0)
            return y.reshape(factors[k], -1)
    return None


def kinds_of(spec: TensorSpec) -> list[str]:
    """The growable axis kinds a tensor touches, in a fixed order."""
    return [k for k in GROWABLE if any(k in d.axes for d in spec.dims)]


@dataclass
class Block:
    """The features one tensor contributes to one axis instance."""

    key: AxisKey
    name: str
    spec: TensorSpec
    layer: int | None
    features: torch.Tensor  # (neurons, d), mean-field units
    unit: float  # the factor that turned the stored tensor into mean-field units


def tensor_items(specs: Iterable[TensorSpec], sizes: Sizes) -> list[tuple[TensorSpec, int | None]]:
    """(spec, layer) for every tensor of a model of these sizes: globals first, then layer by layer."""
    specs = list(specs)
    items: list[tuple[TensorSpec, int | None]] = [(s, None) for s in specs if not s.per_layer]
    for layer in range(sizes.layers):
        items += [(s, layer) for s in specs if s.per_layer]
    return items


def iter_tensors(ckpt: Checkpoint, specs: Iterable[TensorSpec], sizes: Sizes,
                 layers: set[int] | None = None) -> Iterator[tuple[TensorSpec, int | None, torch.Tensor]]:
    """Each tensor as fp32, read one at a time (only the given layers' per-layer tensors, if `layers` is set)."""
    for spec, layer in tensor_items(specs, sizes):
        if layer is not None and layers is not None and layer not in layers:
            continue
        yield spec, layer, ckpt.get(spec.at(layer))


def blocks_of(x: torch.Tensor, spec: TensorSpec, layer: int | None, sizes: Sizes,
              keys: set[AxisKey] | None = None) -> list[Block]:
    """The feature blocks of one tensor, for every axis instance it touches (restricted to `keys` if given)."""
    unit = unit_factor(spec, sizes, "mf")
    out = []
    for kind in kinds_of(spec):
        key = axis_key(kind, layer)
        if keys is not None and key not in keys:
            continue
        f = axis_features(x, spec, sizes, kind)
        assert f is not None
        out.append(Block(key, spec.at(layer), spec, layer, f * unit, unit))
    return out


def neuron_features(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes,
                    key: AxisKey) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """All features of one axis instance as one explicit `(neurons, D)` matrix, with (tensor, width) per block.

    Fine for small models and tests; `growkit.measure.fit` works tensor by tensor through Gram matrices instead.
    """
    layers = None if key[1] is None else {key[1]}
    parts, names = [], []
    for spec, layer, x in iter_tensors(ckpt, specs, sizes, layers):
        for block in blocks_of(x, spec, layer, sizes, {key}):
            parts.append(block.features)
            names.append((block.name, block.features.shape[1]))
    return torch.cat(parts, dim=1), names
