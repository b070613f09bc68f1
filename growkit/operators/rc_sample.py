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
replaces them with draws around them: combinations of source neurons (the map's `Mixing`, applied along the axis in
every tensor of it, so a block where two resized axes cross is mixed along both) plus residual noise. Every reader
entry is multiplied by n/N (mean-field fan-in scaling).
"""

from __future__ import annotations

from typing import Any

import torch

from growkit.apply import generator_for
from growkit.arch.spec import GROWABLE, HIDDEN, PER_LAYER, Family, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap, GrowthMaps, Mixing, ReaderNoise
from growkit.operators.base import Operator, stream_exact
from growkit.operators.depth import depth_map
from growkit.plan import GrowthPlan

DEFAULT_ESTIMATOR = "empirical"  # plain atoms: needs no fit (kde and gaussian read every tensor twice more)
SAMPLINGS = ("iid", "stratified")


class RCSample(Operator):
    """Grow or shrink by sampling neurons from fitted per-axis measures (`estimator`: empirical, kde, gaussian)."""

    name = "rc-sample"
    exact = True
    directions = ("grow", "shrink")

    def __init__(self, estimator: str | None = None, sampling: str | None = None, rank: int | None = None) -> None:
        from growkit.measure.estimators import DEFAULT_RANK, get_estimator

        self.estimator_name = estimator or DEFAULT_ESTIMATOR
        self.rank = DEFAULT_RANK if rank is None else int(rank)
        self.estimator = get_estimator(self.estimator_name, self.rank)  # validates the name early
        self.sampling = sampling or "iid"
        if self.sampling not in SAMPLINGS:
            raise GrowkitError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")

    def settings(self) -> dict[str, Any]:
        return {"estimator": self.estimator_name, "sampling": self.sampling, "rank": self.rank}

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps:
        from growkit.measure.fit import fit_axes

        layer_src, identity = depth_map(plan.depth_method, plan.source.layers, plan.target.layers)
        resized = [k for k in GROWABLE if plan.source.axis(k) != plan.target.axis(k)]
        keys: set[tuple[str, int | None]] = set()
        for kind in resized:
            keys |= {(kind, None)} if kind not in PER_LAYER else {(kind, s) for s in set(layer_src)}
        fits = {}
        if self.estimator.needs_pca and keys:
            fits = fit_axes(ckpt, specs, plan.source, keys, self.rank, residuals=self.estimator.uses_residual)

        maps: dict[tuple[str, int | None], AxisMap] = {}
        instances = [(HIDDEN, None)] + [(k, layer) for layer in range(plan.target.layers) for k in PER_LAYER]
        for kind, layer in instances:
            n, new = plan.source.axis(kind), plan.target.axis(kind)
            if n == new:
                maps[(kind, layer)] = AxisMap.identity(n)
                continue
            fit = fits.get((kind, None if layer is None else layer_src[layer]))
            gen = generator_for(seed, "rc-sample", kind, layer)
            if plan.direction == "shrink":
                src, mixing = self._shrink_draw(n, new, fit, gen)
                maps[(kind, layer)] = AxisMap(n, src, scale=torch.full((new,), n / new), mixing=mixing)
            else:
                maps[(kind, layer)] = self._grow_map(kind, n, new, fit, gen)
        per_layer = {k: v for k, v in maps.items() if k[1] is not None}
        return GrowthMaps(hidden=maps[(HIDDEN, None)], per_layer=per_layer,  # type: ignore[arg-type]
                          layer_src=layer_src, identity_layers=identity)

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

    def _shrink_draw(self, n: int, new: int, fit: Any, gen: torch.Generator) -> tuple[torch.Tensor, Mixing | None]:
        """The atoms of one axis instance when shrinking and, with a fitted measure, the draws around them."""
        atoms = self._atoms(n, new, gen, replacement=False)
        if fit is None:  # empirical: the gather writes the atoms
            return atoms, None
        mixing = self.estimator.fit_pca(fit.pca).mixing(len(atoms), gen, atoms)
        return atoms, Mixing(mixing.dense(n), self._residual_stds(fit))

    def _residual_stds(self, fit: Any) -> dict[str, float]:
        """The isotropic residual's std per source tensor (stored units), for estimators whose draws carry one."""
        if not self.estimator.uses_residual:
            return {}
        return {name: b.residual_std(fit.pca.rank) for name, b in fit.blocks.items()}
