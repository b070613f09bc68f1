"""A MoE checkpoint in transformers 5's fused expert layout, read as the per-expert layout growkit's specs use.

transformers 5 holds each layer's experts as two 3-D tensors (`mlp.experts.gate_up_proj` [E, 2 ffn, hidden], gate
rows first; `mlp.experts.down_proj` [E, hidden, ffn]) and loads files written that way (a `save_file` of a live
model's state dict, `grow_model` of one in memory) as well as the per-expert files `save_pretrained` writes. This
view shows the fused tensors as the per-expert ones, slicing on read, so one set of specs covers both.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from growkit.arch.moe import LAYOUTS, MoeFamily
from growkit.checkpoint.reader import Checkpoint

_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")


class SplitExpertsCheckpoint(Checkpoint):
    """Another checkpoint's fused expert tensors as per-expert names; every other tensor as it is (Mixtral's router,
    `mlp.gate` in memory, under the `block_sparse_moe` name its specs use)."""

    def __init__(self, inner: Checkpoint) -> None:
        self.inner = inner
        self.config, self.source, self.root = inner.config, inner.source, inner.root
        self.config_inferred = inner.config_inferred
        layout = LAYOUTS[inner.config["model_type"]]
        experts = MoeFamily.experts(inner.config)
        self._parts: dict[str, tuple[str, int, slice | None]] = {}  # our name -> (inner name, expert, rows)
        self._names: list[str] = []
        for name in inner.names():
            m = _FUSED.fullmatch(name)
            if m is None:
                router = _ROUTER.fullmatch(name)
                ours = layout.router().format(router.group(1)) if router else name
                self._parts[ours] = (name, -1, None)
                self._names.append(ours)
                continue
            layer, kind = m.group(1), m.group(2)
            rows = inner.shape(name)[1]
            pieces = (("gate_proj", slice(0, rows // 2)), ("up_proj", slice(rows // 2, rows))) if kind == "gate_up_proj" \
                else (("down_proj", slice(None)),)
            for e in range(experts):
                for projection, part in pieces:
                    ours = layout.expert(e, projection).format(layer)
                    self._parts[ours] = (name, e, part)
                    self._names.append(ours)
        self._cached: tuple[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        inner, e, part = self._parts[name]
        shape = self.inner.shape(inner)
        if e < 0:
            return shape
        rows = shape[1] if part is None or part.stop is None else part.stop - part.start
        return (rows, shape[2])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._parts[name][0])

    def get(self, name: str) -> torch.Tensor:
        inner, e, part = self._parts[name]
        if e < 0:
            return self.inner.get(inner)
        if self._cached is None or self._cached[0] != inner:  # a layer's experts are read one after another
            self._cached = (inner, self.inner.get(inner))
        return self._cached[1][e][part].clone()

    def origin(self) -> dict[str, Any]:
        return self.inner.origin()


def split_fused_experts(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` as per-expert tensors when it is a MoE checkpoint in the fused layout; otherwise `ckpt` itself."""
    model_type = ckpt.config.get("model_type")
    if not isinstance(model_type, str) or model_type not in LAYOUTS or not any(map(_FUSED.fullmatch, ckpt.names())):
        return ckpt
    return SplitExpertsCheckpoint(ckpt)
