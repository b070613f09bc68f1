"""`rc-sample`: new neurons drawn from each axis's fitted neuron measure, transferred exactly.

RC / mean-field reading: a network of width n is an n-point sample of per-axis neuron measures, and a wider one is a
larger sample. Growing keeps the n-point sample the source *is* (every source neuron at least once) and draws the
N - n extra neurons' atoms from the fitted measure (`sampling`: i.i.d., or stratified/systematic, which spreads the
draws evenly over the atoms). The estimator decides which neurons exist; a correction makes the transfer exact:
each copy's readers are divided by its atom's multiplicity m_i (the copies together read what the source neuron
read), and on the residual stream each copy's writers are multiplied by sqrt(k / m_i), k = N / n, and its norm
gains divided alike, so an RMSNorm sees the source's statistics at any multiplicity (`AxisMap.exact_writers`).

`empirical` draws plain atoms: the grown model is the source function exactly. `kde` and `gaussian` add their
spread around the drawn atoms to the copies' readers: `kde` its kernel step (a combination of source neurons, so
the same draw in every reader tensor of the axis), `gaussian` its isotropic residual (independent per entry, of each
tensor's fitted size). The noise is made to sum to zero over each atom's copies (a +d / -d pair for two copies) in
`growkit.apply`, so it cancels in every layer's output and the function is still preserved, while the copies are
no longer symmetric and train apart.

Shrinking draws the target's atoms without replacement (stratified: evenly spaced) and, for `kde`/`gaussian`,
replaces them with draws around them, as combinations of source neurons plus residual noise. Every reader entry is
multiplied by n/N (mean-field fan-in scaling). Since a shrunk tensor no longer holds every source neuron, `adjust`
re-reads the source tensor and works on [source block | target block] along each axis (in a fixed order: hidden, kv
heads, query groups, FFN, so a block where two axes cross mixes the already-drawn values), then keeps the target
block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from growkit.apply import ApplyOptions, apply_tensor, generator_for
from growkit.arch.spec import FFN, GROWABLE, HIDDEN, KV_HEADS, PER_LAYER, QGROUP, Dim, Family, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap, GrowthMaps, ReaderNoise
from growkit.operators.base import Operator, stream_exact
from growkit.operators.depth import depth_map
from growkit.plan import GrowthPlan

#: Order in which axes are drawn inside a tensor; fixed, so crossings of two new axes are deterministic.
ORDER = (HIDDEN, KV_HEADS, QGROUP, FFN)
DEFAULT_ESTIMATOR = "empirical"  # plain atoms: needs no fit (kde and gaussian read every tensor twice more)
SAMPLINGS = ("iid", "stratified")
_AXES = ("hidden", "ffn", "kv_heads", "qgroup", "head_dim", "qkv", "vocab", "positions")


@dataclass
class AxisDraw:
    """What `adjust` writes along one axis instance when shrinking: positions (in the target block), their mixing
    weights over the source block, and the residual noise std per source tensor (stored units)."""

    n: int
    new: int
    positions: torch.Tensor
    weights: torch.Tensor | None  # None: the gather already wrote the right values (plain atoms)
    noise: dict[str, float] = field(default_factory=dict)


class RCSample(Operator):
    """Grow or shrink by sampling neurons from fitted per-axis measures (`estimator`: empirical, kde, gaussian)."""

    name = "rc-sample"
    directions = ("grow", "shrink")

    def __init__(self, estimator: str | None = None, sampling: str | None = None, rank: int | None = None) -> None:
        from growkit.measure.estimators import DEFAULT_RANK, get_estimator

        self.estimator_name = estimator or DEFAULT_ESTIMATOR
        self.rank = DEFAULT_RANK if rank is None else int(rank)
        self.estimator = get_estimator(self.estimator_name, self.rank)  # validates the name early
        self.sampling = sampling or "iid"
        if self.sampling not in SAMPLINGS:
            raise GrowkitError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        self.draws: dict[tuple[str, int | None], AxisDraw] = {}
        self._shrink = False
        self._ckpt: Checkpoint | None = None
        self._extended: GrowthMaps | None = None
        self._opts: ApplyOptions | None = None
        self._sizes: dict[str, int] = {}
        self._layer_src: list[int] = []

    def settings(self) -> dict[str, Any]:
        return {"estimator": self.estimator_name, "sampling": self.sampling, "rank": self.rank}

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps:
        from growkit.measure.fit import fit_axes

        layer_src, identity = depth_map(plan.depth_method, plan.source.layers, plan.target.layers)
        self._shrink = plan.direction == "shrink"
        self._layer_src = layer_src
        self._sizes = {a: plan.source.axis(a) for a in _AXES}
        resized = [k for k in GROWABLE if plan.source.axis(k) != plan.target.axis(k)]
        keys: set[tuple[str, int | None]] = set()
        for kind in resized:
            keys |= {(kind, None)} if kind not in PER_LAYER else {(kind, s) for s in set(layer_src)}
        fits = {}
        if self.estimator.needs_pca and keys:
            fits = fit_axes(ckpt, specs, plan.source, keys, self.rank, residuals=self.estimator.uses_residual)

        self.draws = {}
        maps: dict[tuple[str, int | None], AxisMap] = {}
        extended: dict[tuple[str, int | None], AxisMap] = {}
        instances = [(HIDDEN, None)] + [(k, layer) for layer in range(plan.target.layers) for k in PER_LAYER]
        for kind, layer in instances:
            n, new = plan.source.axis(kind), plan.target.axis(kind)
            if n == new:
                maps[(kind, layer)] = extended[(kind, layer)] = AxisMap.identity(n)
                continue
            fit = fits.get((kind, None if layer is None else layer_src[layer]))
            gen = generator_for(seed, "rc-sample", kind, layer)
            if not self._shrink:
                maps[(kind, layer)] = self._grow_map(kind, n, new, fit, gen)
                continue
            draw, src = self._shrink_draw(n, new, fit, gen)
            self.draws[(kind, layer)] = draw
            maps[(kind, layer)] = AxisMap(n, src, scale=torch.full((new,), n / new))
            extended[(kind, layer)] = AxisMap(n, torch.cat([torch.arange(n), src]),
                                              scale=torch.full((n + new,), n / new))

        def growth_maps(m: dict[tuple[str, int | None], AxisMap]) -> GrowthMaps:
            per_layer = {k: v for k, v in m.items() if k[1] is not None}
            return GrowthMaps(hidden=m[(HIDDEN, None)], per_layer=per_layer,  # type: ignore[arg-type]
                              layer_src=layer_src, identity_layers=identity)

        self._opts = ApplyOptions(tied=family.tied(ckpt.config), rms_norm=family.norm == "rms", seed=seed)
        if self._shrink:
            self._ckpt = ckpt
            self._extended = growth_maps(extended)
        return growth_maps(maps)

    def _atoms(self, n: int, count: int, gen: torch.Generator, replacement: bool) -> torch.Tensor:
        """`count` atoms of the uniform measure on n source neurons: i.i.d. (without replacement when shrinking), or
        stratified, one systematic draw per stratum of width n / count (each atom floor or ceil of count / n times)."""
        if self.sampling == "stratified":
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            return ((torch.arange(count, dtype=torch.float64) + u) * n / count).floor().long().clamp(max=n - 1)
        if replacement:
            return torch.randint(n, (count,), generator=gen)
        return torch.randperm(n, generator=gen)[:count]

    def _grow_map(self, kind: str, n: int, new: int, fit: Any, gen: torch.Generator) -> AxisMap:
        """Every source neuron once, then the drawn atoms; the estimator's spread as reader noise on the copies."""
        src = torch.cat([torch.arange(n), self._atoms(n, new - n, gen, replacement=True)])
        noise = None
        if fit is not None:
            scores = self.estimator.fit_pca(fit.pca).around_atoms(new, gen)
            std = self._residual_stds(fit)
            if scores is not None or std:
                noise = ReaderNoise(scores=scores, basis=None if scores is None else fit.pca.u, std=std)
        return stream_exact(kind, AxisMap(n, src, reader_noise=noise))

    def _shrink_draw(self, n: int, new: int, fit: Any, gen: torch.Generator) -> tuple[AxisDraw, torch.Tensor]:
        """The draws of one axis instance when shrinking, and its map's source indices (the atoms)."""
        atoms = self._atoms(n, new, gen, replacement=False)
        positions = torch.arange(new)
        if fit is None:  # empirical: the gather wrote the atoms
            return AxisDraw(n, new, positions, None), atoms
        mixing = self.estimator.fit_pca(fit.pca).mixing(len(atoms), gen, atoms)
        return AxisDraw(n, new, positions, mixing.dense(n), self._residual_stds(fit)), atoms

    def _residual_stds(self, fit: Any) -> dict[str, float]:
        """The isotropic residual's std per source tensor (stored units), for estimators whose draws carry one."""
        if not self.estimator.uses_residual:
            return {}
        return {name: b.residual_std(fit.pca.rank) for name, b in fit.blocks.items()}

    def adjust(self, spec: TensorSpec, layer: int | None, tensor: torch.Tensor, maps: GrowthMaps) -> torch.Tensor:
        if layer is not None and layer in maps.identity_layers and spec.writes_hidden():
            return tensor  # identity blocks' residual writers stay exactly zero
        steps = []
        for kind in ORDER:
            for i, dim in enumerate(spec.dims):
                draw = self.draws.get((kind, layer if kind in PER_LAYER else None))
                if kind in dim.axes and draw is not None and draw.weights is not None:
                    steps.append((i, kind, draw))
        if not steps:
            return tensor
        src_layer = None if layer is None else self._layer_src[layer]
        assert self._ckpt is not None and self._extended is not None and self._opts is not None
        x = apply_tensor(self._ckpt.get(spec.at(src_layer)), spec, layer, self._sizes, self._extended, self._opts)
        reader_scale = self._reader_scale(spec, layer)
        for i, kind, draw in steps:
            std = draw.noise.get(spec.at(src_layer), 0.0) * reader_scale
            gen = generator_for(self._opts.seed, "rc-noise", kind, layer, spec.at(layer)) if std > 0 else None
            x = self._mix(x, spec, i, kind, layer, draw, std, gen)
        return self._target_block(x, spec, layer).to(tensor.dtype).contiguous()

    def _current(self, kind: str, layer: int | None) -> int:
        """Size of an axis in the tensor `adjust` works on (source + target block)."""
        draw = self.draws.get((kind, layer if kind in PER_LAYER else None))
        return self._sizes[kind] if draw is None else draw.n + draw.new

    def _mix(self, x: torch.Tensor, spec: TensorSpec, i: int, kind: str, layer: int | None, draw: AxisDraw,
             std: float, gen: torch.Generator | None) -> torch.Tensor:
        """Overwrite the drawn positions along axis `kind` (in dim `i`) with weights @ source block (+ noise)."""
        dim = spec.dims[i]
        if dim.sections:  # each section that spans the axis, as a plain dim of its own
            def mix(piece: torch.Tensor, part: Dim) -> torch.Tensor:
                part_spec = replace(spec, dims=spec.dims[:i] + (part,) + spec.dims[i + 1:])
                return self._mix(piece, part_spec, i, kind, layer, draw, std, gen) if kind in part.axes else piece
            return self._per_section(x, i, dim, layer, mix)
        factors = [self._current(a, layer) for a in dim.axes]
        k = dim.axes.index(kind)
        shape = list(x.shape)
        moved = x.reshape(shape[:i] + factors + shape[i + 1:]).movedim(i + k, 0)
        rest = moved.shape[1:]
        flat = moved.reshape(moved.shape[0], -1)
        values = draw.weights.to(torch.float64) @ flat[: draw.n].to(torch.float64)  # type: ignore[union-attr]
        if gen is not None:
            values = values + torch.randn(values.shape, generator=gen, dtype=torch.float64) * std
        flat = flat.clone()
        flat[draw.n + draw.positions] = values.to(flat.dtype)
        return flat.reshape(moved.shape[:1] + rest).movedim(0, i + k).reshape(shape)

    def _target_block(self, x: torch.Tensor, spec: TensorSpec, layer: int | None) -> torch.Tensor:
        """Keep the target block [n, n + N) of every resized axis (shrinking)."""
        for i, dim in enumerate(spec.dims):
            if dim.sections:
                x = self._per_section(x, i, dim, layer, lambda piece, part: self._target_dim(piece, i, part, layer))
            else:
                x = self._target_dim(x, i, dim, layer)
        return x

    def _target_dim(self, x: torch.Tensor, i: int, dim: Dim, layer: int | None) -> torch.Tensor:
        factors = [self._current(a, layer) for a in dim.axes]
        shape = list(x.shape)
        y = x.reshape(shape[:i] + factors + shape[i + 1:])
        for k, a in enumerate(dim.axes):
            draw = self.draws.get((a, layer if a in PER_LAYER else None))
            if draw is not None:
                y = y.narrow(i + k, draw.n, draw.new)
        return y.reshape(shape[:i] + [-1] + shape[i + 1:])

    def _per_section(self, x: torch.Tensor, i: int, dim: Dim, layer: int | None,
                     fn: Callable[[torch.Tensor, Dim], torch.Tensor]) -> torch.Tensor:
        """`fn` on each section of a dim made of sections (`Dim.concat`), the results concatenated again."""
        parts = dim.parts()
        pieces = x.split([math.prod(self._current(a, layer) for a in part.axes) for part in parts], i)
        return torch.cat([fn(piece, part) for piece, part in zip(pieces, parts)], i)

    def _reader_scale(self, spec: TensorSpec, layer: int | None) -> float:
        """The product of n/N over the reader factors apply multiplied this tensor by (noise is scaled alike)."""
        assert self._opts is not None
        scale = 1.0
        for dim in spec.dims:
            if dim.role == "in" or (spec.final_norm and HIDDEN in dim.axes and self._opts.tied):
                for a in dim.axes:
                    draw = self.draws.get((a, layer if a in PER_LAYER else None))
                    if draw is not None:
                        scale *= draw.n / draw.new
        return scale
