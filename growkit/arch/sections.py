"""Tensors with a dim made of sections (`Dim.concat`) as plain pieces, for code that reshapes a dim by its axes.

Measuring (features, importance) works on one product of axes per dim; a fused tensor such as Phi-3's `qkv_proj`
is the same as its sections side by side, each a tensor of its own with a plain dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from growkit.arch.spec import Sizes, TensorSpec


def has_sections(spec: TensorSpec) -> bool:
    return any(d.sections for d in spec.dims)


def plain_parts(x: torch.Tensor, spec: TensorSpec, sizes: Sizes) -> list[tuple[TensorSpec, torch.Tensor]]:
    """`x` split along every dim made of sections: (spec with that dim's section as a plain dim, piece) pairs."""
    for i, dim in enumerate(spec.dims):
        if not dim.sections:
            continue
        parts = dim.parts()
        pieces = x.split([p.size(sizes.axis) for p in parts], i)
        out: list[tuple[TensorSpec, torch.Tensor]] = []
        for part, piece in zip(parts, pieces):
            out += plain_parts(piece, replace(spec, dims=spec.dims[:i] + (part,) + spec.dims[i + 1:]), sizes)
        return out
    return [(spec, x)]
