"""Operators that choose which neurons to keep: `subclone` (ranked by importance) and `select` (evenly strided).

In the RC view shrinking is sampling fewer labels: `select` samples them on a fixed stride, `subclone` keeps the
labels that carry the most (weight subcloning). An axis map for a shrink is just `src` = the kept indices in their
original order, the same on every tensor of the axis, so every reader and writer of a kept neuron stays paired.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from growkit.arch.spec import HIDDEN, KV_HEADS, PER_LAYER, QGROUP, Family, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap, GrowthMaps
from growkit.operators.base import Operator
from growkit.operators.depth import depth_map
from growkit.operators.importance import (
    Importance, ModelParts, activation_importance, calibration_tokens, weight_importance,
)
from growkit.plan import GrowthPlan

RESCALE_MODES = ("none", "norm", "fanin")
DEFAULT_RESCALE = "fanin"  # lowest loss right after a 0.5x width shrink in benchmarks/bench_shrink.py
IMPORTANCE_SOURCES = ("activations", "weights")


def strided(old: int, new: int) -> torch.Tensor:
    """`new` evenly strided indices out of `old` (0, old/new, 2 old/new, ...), the weight-selection baseline."""
    return (torch.arange(new) * old) // new


def keep_top(score: torch.Tensor, new: int) -> torch.Tensor:
    """The `new` highest-scoring indices in their original order (ties go to the lower index)."""
    order = torch.sort(-score.double(), stable=True).indices
    return torch.sort(order[:new]).values


def ranked_fill(score: torch.Tensor, new: int) -> torch.Tensor:
    """Growth by ranked duplication: every neuron once, then copies of the top-ranked ones (cycling) up to `new`."""
    old = score.numel()
    order = torch.sort(-score.double(), stable=True).indices
    extra = order.repeat(math.ceil(max(new - old, 0) / old))[: new - old]
    return torch.cat([torch.arange(old), extra])


def _check_shrink(plan: GrowthPlan, name: str) -> None:
    if plan.direction == "shrink" and plan.source == plan.target:
        raise GrowkitError(f"--method {name}: nothing to shrink, the target sizes equal the source's "
                           "(give --width, --hidden/--ffn/--heads/--kv-heads or --layers)")


class Select(Operator):
    """Weight selection: evenly strided neurons on every axis (0, old/new, 2 old/new, ...), whole heads (whole GQA
    groups, and the same query slots in each), evenly strided layers starting with the first; no data needed."""

    name = "select"
    directions = ("shrink",)

    def check(self, plan: GrowthPlan) -> None:
        super().check(plan)
        _check_shrink(plan, self.name)

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        return AxisMap.identity(old) if new == old else AxisMap(old, strided(old, new))

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps:
        gen = torch.Generator().manual_seed(seed)
        layer_src = strided(plan.source.layers, plan.target.layers).tolist()
        hidden = self.axis_map(HIDDEN, plan.source.hidden, plan.target.hidden, gen)
        per_layer = {(kind, layer): self.axis_map(kind, plan.source.axis(kind), plan.target.axis(kind), gen)
                     for layer in range(plan.target.layers) for kind in PER_LAYER}
        return GrowthMaps(hidden=hidden, per_layer=per_layer, layer_src=layer_src)


class Subclone(Operator):
    """Weight subcloning: keep the most important neurons, heads (whole GQA groups) and blocks; grow by duplicating
    the top-ranked ones.

    `calibration`: text files run through the source model (with the checkpoint's own tokenizer, or `tokenizer`) to
    measure importance from activations; without them, weight norms are used and a warning says so.
    `rescale` (shrinking only): "none" keeps the kept weights as they are; "norm" multiplies each hidden-axis norm
    gain by the measured ratio of the norm's statistic over the kept coordinates to that over all, so the kept
    coordinates of every normalised stream keep their source scale; "fanin" does that and also multiplies each
    reader's kept fan-in by sqrt(source energy / kept energy) (per FFN, per attention output, and once for the
    residual stream), so the readers' outputs keep their source scale. "fanin" is the default: it gave the lowest
    loss right after a 0.5x width shrink on both trained sources in benchmarks/bench_shrink.py (see RESULTS.md).
    Without calibration there are no norm statistics, so the gain correction is skipped and "fanin" uses the
    weight-norm scores squared as energies.
    """

    name = "subclone"
    directions = ("grow", "shrink")

    def __init__(self, calibration: Sequence[str | Path] | str | None = None, tokenizer: str | Path | None = None,
                 calibration_tokens: int = 8192, seq_len: int = 256, rescale: str = DEFAULT_RESCALE,
                 importance: str | None = None) -> None:
        if isinstance(calibration, (str, Path)):
            calibration = [calibration]
        self.calibration = [str(c) for c in calibration or []]
        self.tokenizer = tokenizer
        self.calibration_tokens = int(calibration_tokens)
        self.seq_len = int(seq_len)
        if rescale not in RESCALE_MODES:
            raise GrowkitError(f"subclone: rescale must be one of {', '.join(RESCALE_MODES)}, got {rescale!r}")
        self.rescale = rescale
        self.importance_source = importance or ("activations" if self.calibration else "weights")
        if self.importance_source not in IMPORTANCE_SOURCES:
            raise GrowkitError(f"subclone: importance must be one of {', '.join(IMPORTANCE_SOURCES)}")
        if self.importance_source == "activations" and not self.calibration:
            raise GrowkitError("subclone: activation importance needs calibration text (--calibration FILES)")
        if self.calibration_tokens < 2 or self.seq_len < 2:
            raise GrowkitError("subclone: calibration_tokens and seq_len must be at least 2")
        self.scores: Importance | None = None
        self._norm_gain: dict[str, float] = {}

    def check(self, plan: GrowthPlan) -> None:
        super().check(plan)
        _check_shrink(plan, self.name)

    def measure(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                seed: int = 0) -> Importance:
        """Importance scores of the source model (activations on the calibration text, or weight norms)."""
        parts = ModelParts.of(family, specs)
        seq_len = min(self.seq_len, plan.source.positions or self.seq_len)
        if self.importance_source == "weights":
            removes_blocks = plan.target.layers < plan.source.layers
            print("growkit: warning: no calibration text; subclone ranks neurons by weight norms"
                  + (" and blocks by their update on random token ids" if removes_blocks else "")
                  + "; pass --calibration FILES to rank them by activations on real text (without it, --method select "
                  "kept more in benchmarks/bench_shrink.py)", file=sys.stderr)
            imp = weight_importance(ckpt, specs, plan.source, parts)
            if removes_blocks:
                # Weight norms say nothing about how much a block changes the stream (the first block, which turns
                # embeddings into features, has small writers yet the largest relative update); random ids do.
                gen = torch.Generator().manual_seed(seed)
                ids = torch.randint(plan.source.vocab, (max(1, self.calibration_tokens // seq_len), seq_len),
                                    generator=gen)
                imp.blocks = activation_importance(ckpt, specs, plan.source, parts, ids).blocks
            return imp
        tokenizer = self.tokenizer if self.tokenizer is not None else ckpt.root
        tokens = calibration_tokens(self.calibration, tokenizer, seq_len, self.calibration_tokens)
        if int(tokens.max()) >= plan.source.vocab:
            raise GrowkitError(f"calibration: tokenizer {tokenizer} gives token id {int(tokens.max())}, beyond the "
                               f"model's vocabulary of {plan.source.vocab}")
        return activation_importance(ckpt, specs, plan.source, parts, tokens)

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps:
        imp = self.scores = self.measure(ckpt, family, specs, plan, seed)
        src, tgt = plan.source, plan.target
        identity: set[int] = set()
        if tgt.layers < src.layers:
            layer_src = keep_top(imp.blocks, tgt.layers).tolist()
        else:
            layer_src, identity = depth_map(plan.depth_method, src.layers, tgt.layers)

        fanin = plan.direction == "shrink" and self.rescale == "fanin"
        hidden = self._map(imp.hidden, tgt.hidden, imp.hidden_energy if fanin else None)
        per_layer: dict[tuple[str, int], AxisMap] = {}
        for new_layer, s in enumerate(layer_src):
            per_layer[("ffn", new_layer)] = self._map(imp.ffn[s], tgt.ffn, imp.ffn_energy[s] if fanin else None)
            heads, energy = imp.heads[s], imp.head_energy[s]
            kv = self._map(heads.sum(1), tgt.kv_heads, None)
            kept_kv = kv.src if tgt.kv_heads <= src.kv_heads else torch.arange(src.kv_heads)
            qg = self._map(heads[kept_kv].sum(0), tgt.qgroup, None)
            if fanin and (kv.new < kv.old or qg.new < qg.old):
                kept = energy[kv.src][:, qg.src].sum()
                kv.scale = torch.full((kv.new,), float((energy.sum() / kept.clamp(min=1e-30)).sqrt()))
            per_layer[(KV_HEADS, new_layer)] = kv
            per_layer[(QGROUP, new_layer)] = qg

        self._norm_gain = {}
        if plan.direction == "shrink" and self.rescale in ("norm", "fanin") and tgt.hidden < src.hidden:
            for site, share in imp.norm_share.items():
                # norm statistic over the kept coordinates / over all = sqrt(kept share * old / new)
                self._norm_gain[site] = math.sqrt(float(share[hidden.src].sum()) * src.hidden / tgt.hidden)
        return GrowthMaps(hidden=hidden, per_layer=per_layer, layer_src=layer_src, identity_layers=identity)

    @staticmethod
    def _map(score: torch.Tensor, new: int, energy: torch.Tensor | None) -> AxisMap:
        old = score.numel()
        if new == old:
            return AxisMap.identity(old)
        if new > old:
            return AxisMap(old, ranked_fill(score, new))
        src = keep_top(score, new)
        scale = None
        if energy is not None:
            scale = torch.full((new,), float((energy.sum() / energy[src].sum().clamp(min=1e-30)).sqrt()))
        return AxisMap(old, src, scale=scale)

    def adjust(self, spec: TensorSpec, layer: int | None, tensor: torch.Tensor, maps: GrowthMaps) -> torch.Tensor:
        """Norm-gain correction for dropped stream coordinates (the gain only: a LayerNorm's bias is unchanged)."""
        if not self._norm_gain or spec.kind != "norm_weight":
            return tensor
        site = spec.at(None if layer is None else maps.layer_src[layer])
        gain = self._norm_gain.get(site)
        return tensor if gain is None else tensor * gain
