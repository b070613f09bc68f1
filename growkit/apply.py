"""Axis maps x tensors -> new tensors: the only place that gathers, rescales and fills.

A tensor's new value is its old value gathered along each resized axis, reader dimensions multiplied by the
map's reader scale, fresh neurons filled (zeros on the side that keeps them silent, small random values on the other
so they can train), optional symmetric noise on duplicated readers, and identity blocks' residual writers zeroed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from growkit.arch.spec import HIDDEN, Dim, TensorSpec
from growkit.maps import AxisMap, GrowthMaps


@dataclass(frozen=True)
class ApplyOptions:
    """Model-wide facts and choices that `apply_tensor` needs besides the maps."""

    tied: bool
    rms_norm: bool
    seed: int = 0
    noise_snr_db: float | None = None


@dataclass
class _DimPlan:
    """What happened along one tensor dimension: per new position, source group, reader scale and fresh sides."""

    group: torch.Tensor  # flattened source index along the dim, -1 where any factor is fresh
    scale: torch.Tensor  # product of the factors' reader scales
    zero: torch.Tensor  # fresh positions this dim's role keeps at zero
    rand: torch.Tensor  # fresh positions this dim's role fills with small random values


def generator_for(seed: int, *parts: object) -> torch.Generator:
    """A generator seeded from `seed` and a name, so random fills never depend on processing order or threads."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _gated_positions(dim: Dim, sizes: list[int], is_weight: bool) -> torch.Tensor:
    """Positions along a dim whose fresh entries are random rather than zero (see `Dim.gated`)."""
    total = 1
    for s in sizes:
        total *= s
    if not is_weight or dim.gated is False:
        return torch.zeros(total, dtype=torch.bool)
    if dim.gated is True:
        return torch.ones(total, dtype=torch.bool)
    section = torch.arange(total) // (total // sizes[0])
    return torch.isin(section, torch.tensor(dim.gated))


def _gather_dim(x: torch.Tensor, dim_index: int, dim: Dim, sizes: list[int], maps: list[AxisMap | None],
                is_weight: bool) -> tuple[torch.Tensor, _DimPlan]:
    """Gather one dimension factor by factor (reshape, index_select, flatten) and record its per-position plan."""
    lead, trail = list(x.shape[:dim_index]), list(x.shape[dim_index + 1:])
    new_sizes = [m.new if m is not None else s for s, m in zip(sizes, maps)]
    x = x.reshape(lead + sizes + trail)
    group = torch.zeros(1, dtype=torch.long)
    scale = torch.ones(1)
    fresh = torch.zeros(1, dtype=torch.bool)
    zero_side = torch.zeros(1, dtype=torch.bool)
    for k, (size, m) in enumerate(zip(sizes, maps)):
        if m is None:
            src, f, s, z = torch.arange(size), torch.zeros(size, dtype=torch.bool), torch.ones(size), False
        else:
            src, f, s = m.src, m.fresh, m.reader_scale()
            z = m.fresh_zero_side == dim.role
            if not (m.new == m.old and bool(torch.equal(src, torch.arange(m.old)))):  # identity: nothing to move
                x = x.index_select(len(lead) + k, src.clamp(min=0))
        # Row-major product of the factors: extend every per-position vector by this factor.
        group = (group[:, None] * size + src.clamp(min=0)[None, :]).reshape(-1)
        fresh_k = (fresh[:, None] | f[None, :]).reshape(-1)
        zero_side = (zero_side[:, None] | (f & torch.tensor(z))[None, :]).reshape(-1)
        fresh, scale = fresh_k, (scale[:, None] * s[None, :]).reshape(-1)
    total = 1
    for s in new_sizes:
        total *= s
    x = x.reshape(lead + [total] + trail)
    group = torch.where(fresh, -1, group)
    if dim.role == "elem":
        rand, zero = torch.zeros_like(fresh), torch.zeros_like(fresh)
    else:
        gated = _gated_positions(dim, new_sizes, is_weight)
        zero = zero_side & ~gated
        rand = fresh & ~zero
    return x, _DimPlan(group=group, scale=scale, zero=zero, rand=rand)


_CHUNK = 1 << 20


def stable_mean(x: torch.Tensor) -> float:
    """Mean summed in float64, chunk by chunk in a fixed order (numpy, one thread).

    torch's own reductions split the work by thread count, so their last bits, and every value computed from them,
    would change with `torch.set_num_threads`; growth must give byte-identical files whatever the thread count.
    """
    flat = x.detach().reshape(-1).contiguous().numpy()
    if flat.size == 0:
        return 0.0
    return sum(float(flat[i:i + _CHUNK].sum(dtype=np.float64)) for i in range(0, flat.size, _CHUNK)) / flat.size


def stable_std(x: torch.Tensor) -> float:
    """Sample standard deviation (n - 1), thread-count independent like `stable_mean`; 0 for fewer than 2 values."""
    flat = x.detach().reshape(-1).contiguous().numpy()
    if flat.size < 2:
        return 0.0
    mean = stable_mean(x)
    ss = 0.0
    for i in range(0, flat.size, _CHUNK):
        d = flat[i:i + _CHUNK].astype(np.float64) - mean
        ss += float((d * d).sum())
    return (ss / (flat.size - 1)) ** 0.5


def _along(v: torch.Tensor, dim_index: int, ndim: int) -> torch.Tensor:
    """Reshape a per-position vector so it broadcasts along dimension `dim_index` of an `ndim`-d tensor."""
    shape = [1] * ndim
    shape[dim_index] = -1
    return v.reshape(shape)


def _symmetric_noise(x: torch.Tensor, dim_index: int, group: torch.Tensor, std: float,
                     gen: torch.Generator) -> torch.Tensor:
    """Noise that sums to zero over every set of copies of one source reader, so the layer's output is unchanged.

    Worked along `dim_index` in place (no moved, non-contiguous copies): the sums over copies, their means and the
    centring are the same arithmetic in the same order as a per-group loop would do.
    """
    noise = torch.randn(x.shape, generator=gen).mul_(std)
    valid = group >= 0
    g = group.clamp(min=0)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    ndim = x.dim()
    shape = list(x.shape)
    shape[dim_index] = n_groups
    if bool(valid.all()):
        sums = torch.zeros(shape).index_add_(dim_index, g, noise)
    else:
        idx = valid.nonzero().reshape(-1)
        sums = torch.zeros(shape).index_add_(dim_index, g[idx], noise.index_select(dim_index, idx))
    counts = torch.bincount(g[valid], minlength=n_groups).to(x.dtype)
    sums.div_(_along(counts.clamp(min=1), dim_index, ndim))  # now the mean over each group's copies
    noise.sub_(sums.index_select(dim_index, g))
    silent = ~valid | (counts[g] < 2)  # fresh, or a lone copy, which cannot move without changing the function
    if bool(silent.any()):
        noise.index_fill_(dim_index, silent.nonzero().reshape(-1), 0.0)
    return noise


def apply_tensor(x: torch.Tensor, spec: TensorSpec, layer: int | None, axis_sizes: dict[str, int],
                 maps: GrowthMaps, opts: ApplyOptions) -> torch.Tensor:
    """The grown value of one fp32 source tensor `x` described by `spec`, in new layer `layer`.

    `x` itself is never modified, but the result may share its memory where nothing changes (identity maps).
    """
    if x.dim() != len(spec.dims):
        raise ValueError(f"{spec.name}: expected {len(spec.dims)} dims, got shape {tuple(x.shape)}")
    source = x
    plans: list[_DimPlan] = []
    for i, dim in enumerate(spec.dims):
        sizes = [axis_sizes[a] for a in dim.axes]
        factor_maps = [maps.get(a, layer) for a in dim.axes]
        x, plan = _gather_dim(x, i, dim, sizes, factor_maps, spec.kind == "weight")
        plans.append(plan)
    # Gathering made a new tensor unless every map was the identity; only a tensor of our own is changed in place
    # (in-place arithmetic on a multi-hundred-MB tensor saves both the copy and the page faults of a new one).
    owned = x.numel() == 0 or x.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()

    def own() -> None:
        nonlocal x, owned
        if not owned:
            x, owned = x.clone(), True

    ndim = x.dim()
    for i, (dim, plan) in enumerate(zip(spec.dims, plans)):
        if dim.role == "in" or (spec.final_norm and opts.tied and HIDDEN in dim.axes):
            if not bool((plan.scale == 1).all()):  # multiplying by exactly 1 changes no bit
                own()
                x.mul_(_along(plan.scale, i, ndim))
        if dim.role == "elem" and spec.kind == "norm_weight" and opts.rms_norm and HIDDEN in dim.axes:
            ratio = maps.hidden.stream_energy_ratio()
            if ratio != 1.0:
                own()
                x.mul_(ratio**0.5)

    std: float | None = None
    if opts.noise_snr_db is not None:
        std = stable_std(source)
        if std > 0:
            gen = generator_for(opts.seed, "noise", spec.at(layer))
            for i, (dim, plan) in enumerate(zip(spec.dims, plans)):
                if dim.role == "in":
                    x, owned = x + _symmetric_noise(x, i, plan.group, std * 10 ** (-opts.noise_snr_db / 20), gen), True

    # Fresh positions: full-size masks only for tensors that have any (clone and net2net never do).
    fresh = x.numel() > 0 and any(bool(p.rand.any()) or bool(p.zero.any()) or (d.role == "elem" and bool((p.group < 0).any()))
                                  for d, p in zip(spec.dims, plans))
    if fresh:
        rand = torch.zeros(x.shape, dtype=torch.bool)
        elem_fresh = torch.zeros(x.shape, dtype=torch.bool)
        for i, (dim, plan) in enumerate(zip(spec.dims, plans)):
            rand |= _along(plan.rand, i, ndim)
            if dim.role == "elem":
                elem_fresh |= _along(plan.group < 0, i, ndim)
        if rand.any():
            if std is None:
                std = stable_std(source)
            gen = generator_for(opts.seed, "fresh", spec.at(layer))
            x = torch.where(rand, torch.randn(x.shape, generator=gen) * (std or 0.02), x)
        if elem_fresh.any():
            # Fresh RMSNorm gains scale a zero stream entry, so any value is exact: take the mean so they train like
            # the rest. Under LayerNorm a zero entry normalises to -mean/std, which a non-zero gain would pass on.
            fill = torch.tensor(0.0)
            if spec.kind == "norm_weight" and opts.rms_norm and bool((~elem_fresh).any()):
                fill = torch.tensor(stable_mean(x[~elem_fresh]), dtype=x.dtype)
            x = torch.where(elem_fresh, fill, x)
        owned = True
        for i, plan in enumerate(plans):
            if bool(plan.zero.any()):
                x.index_fill_(i, plan.zero.nonzero().reshape(-1), 0.0)

    if layer is not None and layer in maps.identity_layers and spec.writes_hidden():
        x = torch.zeros_like(x)
    return x.contiguous()


def source_index(spec: TensorSpec, layer: int | None, axis_sizes: dict[str, int], maps: GrowthMaps) -> torch.Tensor:
    """For each entry of the grown tensor, the flat index of the source entry it is gathered from (-1 where fresh).

    Per-entry state that is not a weight (an optimizer's moments) follows the weights through this, the same
    gathers `apply_tensor` makes, so the two cannot disagree.
    """
    shape = [math.prod(axis_sizes[a] for a in dim.axes) for dim in spec.dims]
    index = torch.arange(math.prod(shape)).reshape(shape)
    fresh = torch.zeros((), dtype=torch.bool)
    for i, dim in enumerate(spec.dims):
        index, plan = _gather_dim(index, i, dim, [axis_sizes[a] for a in dim.axes],
                                  [maps.get(a, layer) for a in dim.axes], spec.kind == "weight")
        fresh = fresh | _along(plan.group < 0, i, len(shape))
    return torch.where(fresh, -1, index).contiguous()
