"""Per-axis neuron measures fitted from a checkpoint, reading one tensor at a time.

Each tensor contributes a block of features to every axis instance it touches. Blocks are weighted so that each
tensor carries the same total weight per neuron (an embedding column of 50k entries would otherwise drown a norm
gain), and summed into one `n x n` Gram matrix per axis instance. That is all `kde` needs. `gaussian` also needs
its residual per block, which takes a second pass: the residual is isotropic *within* each tensor's block (a single
isotropic variance across blocks of very different widths would put almost all of it into the widest tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from growkit.arch.spec import Sizes, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.measure.estimators import DEFAULT_RANK, NeuronPCA
from growkit.measure.features import AxisKey, Block, blocks_of, iter_tensors, kinds_of

_CHUNK = 8192


@dataclass
class BlockFit:
    """One tensor's part of an axis instance: its width, weight and (after the second pass) residual."""

    name: str
    width: int
    weight: float  # multiplies the mean-field features so the block has mean squared norm 1 per neuron
    unit: float  # the mean-field factor (fan-in) of the tensor
    variance: float = 0.0  # total variance of the weighted block
    explained: float = 0.0  # its part of the top-r components' variance
    share: float = 0.0  # fraction of the r unit principal directions' squared norm inside this block

    def residual_std(self, rank: int) -> float:
        """Standard deviation of the isotropic residual per entry, in the stored tensor's units."""
        if self.weight == 0:
            return 0.0
        dof = max(self.width - rank * self.share, 1e-9)
        return math.sqrt(max(self.variance - self.explained, 0.0) / dof) / (self.weight * self.unit)


@dataclass
class AxisFit:
    """Gram matrix, blocks and PCA of one axis instance."""

    key: AxisKey
    n: int
    gram: torch.Tensor
    blocks: dict[str, BlockFit] = field(default_factory=dict)
    pca: NeuronPCA | None = None

    @property
    def dim(self) -> int:
        return sum(b.width for b in self.blocks.values())

    def add(self, block: Block) -> None:
        f = block.features
        starts = range(0, f.shape[1], _CHUNK)  # fp64 a slice at a time: an embedding can be 128k wide
        sq = sum(float((f[:, start:start + _CHUNK].to(torch.float64) ** 2).sum()) for start in starts)
        weight = math.sqrt(self.n / sq) if sq > 0 else 0.0
        for start in starts:
            part = f[:, start:start + _CHUNK].to(torch.float64)
            self.gram += (weight**2) * (part @ part.T)
        self.blocks[block.name] = BlockFit(block.name, f.shape[1], weight, block.unit)

    def add_residual(self, block: Block) -> None:
        """Second pass: how much of this block's variance the top-r components explain."""
        assert self.pca is not None
        b = self.blocks[block.name]
        f = block.features.to(torch.float64)
        centred = b.weight * (f - f.mean(0))
        denom = max(self.n - 1, 1)
        b.variance = float((centred**2).sum()) / denom
        if self.pca.rank:
            proj = self.pca.u.T @ centred  # (r, width)
            norms = (proj**2).sum(1)
            b.explained = float(norms.sum()) / denom
            b.share = float((norms / self.pca.s2).sum()) / self.pca.rank


def fit_axes(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes, keys: set[AxisKey],
             rank: int = DEFAULT_RANK, residuals: bool = False, keep_gram: bool = False) -> dict[AxisKey, AxisFit]:
    """Fit every axis instance in `keys`: one pass for the Gram matrices (two with `residuals`).

    A per-layer axis's Gram is complete once the next layer starts; its PCA is taken then and the `n x n` Gram
    dropped (unless `keep_gram`), so only one layer's Grams are held at a time.
    """
    fits: dict[AxisKey, AxisFit] = {}
    global_axis = any(key[1] is None for key in keys)
    layers = None if global_axis else {key[1] for key in keys if key[1] is not None}
    kinds = {key[0] for key in keys}
    specs = [s for s in specs if set(kinds_of(s)) & kinds and (s.per_layer or global_axis)]

    def finish(fit: AxisFit) -> None:
        fit.pca = NeuronPCA.from_gram(fit.gram, fit.dim, rank)
        if not keep_gram:
            fit.gram = torch.zeros(0, 0, dtype=torch.float64)

    for spec, layer, x in iter_tensors(ckpt, specs, sizes, layers):
        if layer is not None:
            for fit in fits.values():
                if fit.pca is None and fit.key[1] is not None and fit.key[1] < layer:
                    finish(fit)
        for block in blocks_of(x, spec, layer, sizes, keys):
            if block.key not in fits:
                n = sizes.axis(block.key[0])
                fits[block.key] = AxisFit(block.key, n, torch.zeros(n, n, dtype=torch.float64))
            fits[block.key].add(block)
    for fit in fits.values():
        if fit.pca is None:
            finish(fit)
    if residuals:
        for spec, layer, x in iter_tensors(ckpt, specs, sizes, layers):
            for block in blocks_of(x, spec, layer, sizes, keys):
                fits[block.key].add_residual(block)
    return fits
