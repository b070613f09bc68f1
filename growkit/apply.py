"""Axis maps x tensors -> new tensors: the only place that gathers, rescales and fills.

A tensor's new value is its old value gathered along each resized axis; then noise on duplicated readers (symmetric
noise asked with `noise_snr_db`, an operator's reader noise), made to sum to zero over each neuron's copies so the
function is unchanged; then reader dimensions multiplied by the map's reader scale and, where every norm on the
residual stream is an RMSNorm, residual writers by the hidden map's writer scale and hidden norm gains divided by it; fresh neurons filled (zeros on the side
that keeps them silent, small random values on the other so they can train), identity blocks' residual writers
zeroed, and a whole-tensor gain where the maps give one. Along an axis whose map mixes source neurons (`Mixing`),
the gather is a combination instead, with its residual noise on every entry.

Upcycling (`growkit upcycle`) writes here too: each expert is the dense FFN gathered through its own map on `ffn`;
what lies across experts, which one tensor's maps cannot say (router rows, noise that cancels over the copies of a
slice, Drop-Upcycling's re-drawn neurons, the shared expert's gate), is the last section.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from growkit.arch.spec import FFN, HIDDEN, QKV, Dim, Sizes, TensorSpec
from growkit.maps import AxisMap, GrowthMaps

if TYPE_CHECKING:
    from growkit.operators.upcycle import UpcyclePlan


@dataclass(frozen=True)
class ApplyOptions:
    """Model-wide facts and choices that `apply_tensor` needs besides the maps."""

    tied: bool
    rms_stream: bool  # every norm on the residual stream is an RMSNorm (`growkit.arch.spec.rms_stream`)
    seed: int = 0
    noise_snr_db: float | None = None


@dataclass
class _DimPlan:
    """What happened along one tensor dimension: per new position, source group, reader scale and fresh sides."""

    group: torch.Tensor  # flattened source index along the dim, -1 where any factor is fresh
    scale: torch.Tensor  # product of the factors' reader scales
    writer: torch.Tensor  # product of the factors' writer scales
    zero: torch.Tensor  # fresh positions this dim's role keeps at zero
    rand: torch.Tensor  # fresh positions this dim's role fills with small random values


def generator_for(seed: int, *parts: object) -> torch.Generator:
    """A generator seeded from `seed` and a name, so random fills never depend on processing order or threads."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _gated_positions(dim: Dim, sizes: list[int], is_weight: bool) -> torch.Tensor:
    """Positions along a dim whose fresh entries are random rather than zero (see `Dim.gated`)."""
    total = math.prod(sizes)
    if not is_weight or dim.gated is False:
        return torch.zeros(total, dtype=torch.bool)
    if dim.gated is True:
        return torch.ones(total, dtype=torch.bool)
    k = dim.axes.index(QKV)  # leading in GPT-2's c_attn, inside each head in GPT-NeoX's query_key_value
    section = torch.arange(total) // math.prod(sizes[k + 1:]) % sizes[k]
    return torch.isin(section, torch.tensor(dim.gated))


def _gather_dim(x: torch.Tensor, dim_index: int, dim: Dim, sizes: list[int], maps: list[AxisMap | None],
                is_weight: bool) -> tuple[torch.Tensor, _DimPlan]:
    """Gather one dimension factor by factor (reshape, index_select, flatten) and record its per-position plan."""
    lead, trail = list(x.shape[:dim_index]), list(x.shape[dim_index + 1:])
    new_sizes = [m.new if m is not None else s for s, m in zip(sizes, maps)]
    x = x.reshape(lead + sizes + trail)
    group = torch.zeros(1, dtype=torch.long)
    scale = torch.ones(1)
    writer = torch.ones(1)
    fresh = torch.zeros(1, dtype=torch.bool)
    zero_side = torch.zeros(1, dtype=torch.bool)
    for k, (size, m) in enumerate(zip(sizes, maps)):
        if m is None:
            src, f, s, z = torch.arange(size), torch.zeros(size, dtype=torch.bool), torch.ones(size), False
            w = torch.ones(size)
        else:
            src, f, s = m.src, m.fresh, m.reader_scale()
            w = m.writer if m.writer is not None else torch.ones(m.new)
            z = m.fresh_zero_side == dim.role
            if m.mixing is not None and x.is_floating_point():  # an index tensor follows each neuron's atom
                x = _mixed(x, len(lead) + k, m.mixing.weights)
            elif not (m.new == m.old and bool(torch.equal(src, torch.arange(m.old)))):  # identity: nothing to move
                x = x.index_select(len(lead) + k, src.clamp(min=0))
        # Row-major product of the factors: extend every per-position vector by this factor.
        group = (group[:, None] * size + src.clamp(min=0)[None, :]).reshape(-1)
        fresh_k = (fresh[:, None] | f[None, :]).reshape(-1)
        zero_side = (zero_side[:, None] | (f & torch.tensor(z))[None, :]).reshape(-1)
        fresh, scale = fresh_k, (scale[:, None] * s[None, :]).reshape(-1)
        writer = (writer[:, None] * w[None, :]).reshape(-1)
    x = x.reshape(lead + [math.prod(new_sizes)] + trail)
    group = torch.where(fresh, -1, group)
    if dim.role == "elem":
        rand, zero = torch.zeros_like(fresh), torch.zeros_like(fresh)
    else:
        gated = _gated_positions(dim, new_sizes, is_weight)
        zero = zero_side & ~gated
        rand = fresh & ~zero
    return x, _DimPlan(group=group, scale=scale, writer=writer, zero=zero, rand=rand)


def _mixed(x: torch.Tensor, axis: int, weights: torch.Tensor) -> torch.Tensor:
    """`x` with dimension `axis` replaced by `weights @` it ((new, old) combinations of the source positions), in
    float64."""
    mixed = x.movedim(axis, -1).to(torch.float64) @ weights.to(torch.float64).T
    return mixed.to(x.dtype).movedim(-1, axis)


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


def _zero_sum(noise: torch.Tensor, dim_index: int, group: torch.Tensor) -> torch.Tensor:
    """`noise` (changed in place) made to sum to zero over every set of copies of one source reader, so the layer's
    output is unchanged: each copy loses the mean of its set and is multiplied by sqrt(m / (m - 1)), which gives it
    back the variance it was drawn with (two copies become an exact +d / -d pair). A lone copy or a fresh position
    cannot move without changing the function: it gets none.

    Worked along `dim_index` in place (no moved, non-contiguous copies), in the same order whatever the thread count.
    """
    valid = group >= 0
    g = group.clamp(min=0)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    ndim = noise.dim()
    shape = list(noise.shape)
    shape[dim_index] = n_groups
    if bool(valid.all()):
        sums = torch.zeros(shape).index_add_(dim_index, g, noise)
    else:
        idx = valid.nonzero().reshape(-1)
        sums = torch.zeros(shape).index_add_(dim_index, g[idx], noise.index_select(dim_index, idx))
    counts = torch.bincount(g[valid], minlength=n_groups).to(noise.dtype)
    sums.div_(_along(counts.clamp(min=1), dim_index, ndim))  # now the mean over each group's copies
    noise.sub_(sums.index_select(dim_index, g))
    m = counts[g]
    factor = torch.where(valid & (m >= 2), (m / (m - 1).clamp(min=1)).sqrt(), 0.0)
    return noise.mul_(_along(factor, dim_index, ndim))


def _first_copies(m: AxisMap) -> torch.Tensor:
    """For each source neuron, the first new position that copies it (every source neuron must be copied)."""
    kept = (~m.fresh).nonzero().reshape(-1)
    first = torch.full((m.old,), m.new, dtype=torch.long).scatter_reduce_(0, m.src[kept], kept, "amin")
    if bool((first == m.new).any()):
        raise ValueError("reader noise needs every source neuron copied at least once")
    return first


def _reader_noise(x: torch.Tensor, dim_index: int, new_sizes: list[int], maps: list[AxisMap | None],
                  src_name: str, gen: torch.Generator) -> torch.Tensor | None:
    """The operators' reader noise along one gathered dimension (before zero-summing), or None when there is none.

    A `ReaderNoise` with offsets perturbs each new position by a combination of the source neurons' slices, read off
    the gathered tensor at each source neuron's first copy; with `std`, by independent noise of that tensor's size.
    """
    lead, trail = list(x.shape[:dim_index]), list(x.shape[dim_index + 1:])
    noise: torch.Tensor | None = None
    for k, m in enumerate(maps):
        rn = m.reader_noise if m is not None else None
        if rn is None:
            continue
        assert m is not None
        part = torch.zeros(x.shape)
        if rn.scores is not None and rn.basis is not None:
            xf = x.reshape(lead + new_sizes + trail).movedim(len(lead) + k, -1)
            block = xf.index_select(xf.dim() - 1, _first_copies(m)).to(torch.float64)
            offsets = (block @ rn.basis) @ rn.scores.T  # (..., new): each position's combination of source slices
            part += offsets.to(torch.float32).movedim(-1, len(lead) + k).reshape(x.shape)
        std = rn.std.get(src_name, 0.0)
        if std > 0:
            part += torch.randn(x.shape, generator=gen) * std
        noise = part if noise is None else noise + part
    return noise


def size_factor(spec: TensorSpec, layer: int | None, maps: GrowthMaps) -> float:
    """What growth multiplies a tensor by for the size its effect depends on (`TensorSpec.size_power`)."""
    if spec.size_power is None:
        return 1.0
    axis, power = spec.size_power
    m = maps.get(axis, layer)
    return 1.0 if m is None else float((m.new / m.old) ** power)


def apply_tensor(x: torch.Tensor, spec: TensorSpec, layer: int | None, sizes: Sizes, maps: GrowthMaps,
                 opts: ApplyOptions) -> torch.Tensor:
    """The grown value of one fp32 source tensor `x` described by `spec` (at the source's `sizes`), in new layer
    `layer`.

    `x` itself is never modified, but the result may share its memory where nothing changes (identity maps).
    """
    if x.dim() != len(spec.dims):
        raise ValueError(f"{spec.name}: expected {len(spec.dims)} dims, got shape {tuple(x.shape)}")
    maps = maps.for_tensor(spec.name)  # a MoE expert's own ffn maps
    source = x
    plans: list[_DimPlan] = []
    dim_maps: list[list[AxisMap | None]] = []
    for i, dim in enumerate(spec.dims):
        if dim.sections or dim.normed:
            x, plan = _gather_parts(x, i, dim, sizes, maps, layer, spec.kind == "weight")
            plans.append(plan)
            dim_maps.append([maps.get(a, layer) for a in dim.axes])  # for the mixing noise: every axis it spans
            continue
        factor_maps = [maps.get(a, layer) for a in dim.axes]
        x, plan = _gather_dim(x, i, dim, sizes.factors(dim), factor_maps, spec.kind == "weight")
        plans.append(plan)
        dim_maps.append(factor_maps)
    # Gathering made a new tensor unless every map was the identity; only a tensor of our own is changed in place
    # (in-place arithmetic on a multi-hundred-MB tensor saves both the copy and the page faults of a new one).
    owned = x.numel() == 0 or x.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()

    def own() -> None:
        nonlocal x, owned
        if not owned:
            x, owned = x.clone(), True

    # Reader noise goes on before the rescale, so it is scaled with the values it perturbs: its signal-to-noise ratio
    # is the one asked, whatever each copy's multiplicity.
    std: float | None = None
    src_name = spec.at(None if layer is None else maps.layer_src[layer])
    for dim, factor_maps in zip(spec.dims, dim_maps):  # mixed neurons carry their estimator's residual noise
        for axis, m in zip(dim.axes, factor_maps):
            mix_std = m.mixing.std.get(src_name, 0.0) if m is not None and m.mixing is not None else 0.0
            if mix_std > 0:
                own()
                x.add_(torch.randn(x.shape, generator=generator_for(opts.seed, "rc-noise", axis, layer,
                                                                     spec.at(layer))).mul_(mix_std))
    for i, (dim, plan, factor_maps) in enumerate(zip(spec.dims, plans, dim_maps)):
        if dim.role != "in":
            continue
        gen = generator_for(opts.seed, "reader-noise", spec.at(layer), i)
        if dim.sections or dim.normed:
            noise = _parts_reader_noise(x, i, dim, sizes, maps, layer, src_name, gen)
        else:
            new_sizes = [m.new if m is not None else n for n, m in zip(sizes.factors(dim), factor_maps)]
            noise = _reader_noise(x, i, new_sizes, factor_maps, src_name, gen)
        if opts.noise_snr_db is not None:
            std = stable_std(source) if std is None else std
            if std > 0:
                asked = torch.randn(x.shape, generator=generator_for(opts.seed, "noise", spec.at(layer)))
                asked.mul_(std * 10 ** (-opts.noise_snr_db / 20))
                noise = asked if noise is None else noise.add_(asked)
        if noise is not None:
            x, owned = x + _zero_sum(noise, i, plan.group), True

    ndim = x.dim()
    rms_stream = opts.rms_stream and maps.hidden.writer is not None
    for i, (dim, plan) in enumerate(zip(spec.dims, plans)):
        factor = torch.ones(plan.scale.shape)
        if dim.role == "in" or (spec.final_norm and opts.tied and HIDDEN in dim.axes):
            factor = factor * plan.scale
        if rms_stream and HIDDEN in dim.axes:
            if dim.role == "out":  # a residual writer: embedding column, o_proj / down_proj row or bias
                factor = factor * plan.writer
            elif spec.kind == "norm_weight" and spec.stream != "post_norm":  # a gain on the stream; a tied head
                # also reads the scaled embedding (a post-norm's gain writes the stream: its input carries the scale)
                factor = factor / (plan.writer**2 if spec.final_norm and opts.tied else plan.writer)
            elif dim.role == "in" and spec.stream == "raw_reader":  # reads the scaled copies themselves
                factor = factor / plan.writer
        if opts.rms_stream and dim.normed:
            factor = factor * _normed_factor(dim, spec, plan)
        if i == 0:
            factor = factor * size_factor(spec, layer, maps)
        if not bool((factor == 1).all()):  # multiplying by exactly 1 changes no bit
            own()
            if spec.gain_offset:  # the gain is offset + w (Gemma: 1 + w): the gain is what is rescaled
                x = spec.rescaled(x, _along(factor, i, ndim))
            else:
                x.mul_(_along(factor, i, ndim))

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
            if spec.kind == "norm_weight" and spec.norm and spec.norm.kind == "rms" and bool((~elem_fresh).any()):
                fill = torch.tensor(stable_mean(x[~elem_fresh]), dtype=x.dtype)
            x = torch.where(elem_fresh, fill, x)
        owned = True
        for i, plan in enumerate(plans):
            if bool(plan.zero.any()):
                x.index_fill_(i, plan.zero.nonzero().reshape(-1), 0.0)

    if layer is not None and layer in maps.identity_layers and spec.writes_hidden():
        x = torch.full_like(x, -spec.gain_offset)  # zero, or for a post-norm's offset gain, the gain zero
    if src_name in maps.gains:
        x = spec.rescaled(x, maps.gains[src_name])
    return x.contiguous()


def source_index(spec: TensorSpec, layer: int | None, sizes: Sizes, maps: GrowthMaps) -> torch.Tensor:
    """For each entry of the grown tensor, the flat index of the source entry it is gathered from (-1 where fresh).

    Per-entry state that is not a weight (an optimizer's moments) follows the weights through this, the same
    gathers `apply_tensor` makes, so the two cannot disagree.
    """
    shape = sizes.shape(spec)
    index = torch.arange(math.prod(shape)).reshape(shape)
    maps = maps.for_tensor(spec.name)
    fresh = torch.zeros((), dtype=torch.bool)
    for i, dim in enumerate(spec.dims):
        if dim.sections or dim.normed:
            index, plan = _gather_parts(index, i, dim, sizes, maps, layer, spec.kind == "weight")
        else:
            index, plan = _gather_dim(index, i, dim, sizes.factors(dim), [maps.get(a, layer) for a in dim.axes],
                                      spec.kind == "weight")
        fresh = fresh | _along(plan.group < 0, i, len(shape))
    return torch.where(fresh, -1, index).contiguous()


# Dims made of sections (`Dim.concat`) and dims normalised as a whole (`Dim.normed`): each section is gathered with
# its own axes' maps as a plain dim and the sections concatenated again; a normed dim's maps carry the writer scale.

def _part_maps(part: Dim, maps: GrowthMaps, layer: int | None) -> list[AxisMap | None]:
    """The maps of a plain dim's factors; on a normed dim with the writer scale that keeps the norm's statistic."""
    factor_maps = [maps.get(a, layer) for a in part.axes]
    return [m.exact_writers() if part.normed and m is not None else m for m in factor_maps]


def _gather_parts(x: torch.Tensor, dim_index: int, dim: Dim, sizes: Sizes, maps: GrowthMaps,
                  layer: int | None, is_weight: bool) -> tuple[torch.Tensor, _DimPlan]:
    """`_gather_dim` section by section, the pieces and their plans concatenated (source groups kept apart)."""
    pieces, plans, offset = [], [], 0
    for part, piece in zip(dim.parts(), x.split([sizes.dim_size(part) for part in dim.parts()], dim_index)):
        y, plan = _gather_dim(piece, dim_index, part, sizes.factors(part), _part_maps(part, maps, layer), is_weight)
        if part.normed and part.role == "out" and not part.gated:  # the norm's statistic counts fresh entries
            plan.zero, plan.rand = plan.group < 0, torch.zeros_like(plan.rand)
        plan.group = torch.where(plan.group < 0, -1, plan.group + offset)
        offset += piece.shape[dim_index]
        pieces.append(y)
        plans.append(plan)
    fields = ("group", "scale", "writer", "zero", "rand")
    joined = _DimPlan(*(torch.cat([getattr(p, f) for p in plans]) for f in fields))
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim_index)), joined


def _parts_reader_noise(x: torch.Tensor, dim_index: int, dim: Dim, sizes: Sizes, maps: GrowthMaps,
                        layer: int | None, src_name: str, gen: torch.Generator) -> torch.Tensor | None:
    """`_reader_noise` along a dim made of sections (or normed), section by section on the gathered tensor."""
    part_maps = [_part_maps(part, maps, layer) for part in dim.parts()]
    new_sizes = [[m.new if m is not None else n for n, m in zip(sizes.factors(part), factor_maps)]
                 for part, factor_maps in zip(dim.parts(), part_maps)]
    pieces = x.split([math.prod(s) for s in new_sizes], dim_index)
    noises = [_reader_noise(piece, dim_index, sizes, factor_maps, src_name, gen)
              for sizes, factor_maps, piece in zip(new_sizes, part_maps, pieces)]
    if all(n is None for n in noises):
        return None
    return torch.cat([torch.zeros(p.shape) if n is None else n for n, p in zip(noises, pieces)], dim_index)


def _normed_factor(dim: Dim, spec: TensorSpec, plan: _DimPlan) -> torch.Tensor:
    """A dim normalised as a whole: its writers carry the writer scale, the norm's gain divides it out (its fresh
    writers are zero unless gated: they count in the norm's statistic, which a zero entry keeps)."""
    if dim.role == "out":
        return plan.writer
    if spec.kind == "norm_weight":
        return 1.0 / plan.writer
    return torch.ones(plan.writer.shape)


# --- upcycling: an `UpcyclePlan` x dense tensors -> expert, router and shared-expert tensors ----------------------

def _expert_maps(plan: UpcyclePlan, layer: int, ffn_map: AxisMap) -> GrowthMaps:
    return GrowthMaps(hidden=AxisMap.identity(plan.source.hidden), per_layer={(FFN, layer): ffn_map},
                      layer_src=list(range(plan.source.layers)))


def _ffn_dim(spec: TensorSpec) -> int:
    return next(i for i, d in enumerate(spec.dims) if FFN in d.axes)


def expert_tensor(x: torch.Tensor, spec: TensorSpec, layer: int, plan: UpcyclePlan, expert: int,
                  sizes: Sizes, seed: int) -> torch.Tensor:
    """Routed expert `expert`'s value of a dense FFN tensor `x` (gate_proj, up_proj or down_proj) in `layer`."""
    ffn_map = plan.expert_maps[expert]
    opts = ApplyOptions(tied=False, rms_stream=True)  # the hidden map is the identity: no stream scale either way
    y = apply_tensor(x, spec, layer, sizes, _expert_maps(plan, layer, ffn_map), opts)
    dim = _ffn_dim(spec)
    reader = spec.dims[dim].role == "in"
    factor = float(ffn_map.reader_scale()[0]) if reader else 1.0
    request = plan.request
    if request.expert_noise_db is not None and reader:
        y = y.clone() if y.data_ptr() == x.data_ptr() else y
        y.add_(_copy_noise(x, y.shape, layer, expert, plan, seed), alpha=factor)
    if request.reinit_ratio > 0:
        positions = plan.reinit_positions(generator_for(seed, "reinit", layer, expert))
        gen = generator_for(seed, "reinit-values", spec.at(layer), expert)
        shape = list(y.shape)
        shape[dim] = positions.numel()
        fresh = torch.randn(shape, generator=gen) * stable_std(x) + stable_mean(x)
        y = y.clone() if y.data_ptr() == x.data_ptr() else y
        y.index_copy_(dim, positions, fresh * factor)
    return y.contiguous()


def _copy_noise(x: torch.Tensor, shape: torch.Size, layer: int, expert: int, plan: UpcyclePlan,
                seed: int) -> torch.Tensor:
    """Noise on one expert's readers that sums to zero over the copies of its slice: copy c gets (z_c - z_{c+1}) /
    sqrt(2) with the copies' draws taken cyclically, so the sum telescopes to zero and each copy's noise has the
    asked variance (two copies get an exact +d / -d pair)."""
    copies, routed = plan.copies, plan.routed_slices
    copy, piece = divmod(expert, routed)
    std = stable_std(x) * 10 ** (-float(plan.request.expert_noise_db or 0.0) / 20)

    def draw(c: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator_for(seed, "expert-noise", layer, piece, c % copies))

    return (draw(copy) - draw(copy + 1)).mul_(std / 2**0.5)


def shared_tensor(x: torch.Tensor, spec: TensorSpec, layer: int, plan: UpcyclePlan,
                  sizes: Sizes, seed: int) -> torch.Tensor:
    """The shared expert's value of a dense FFN tensor: its slices (down_proj x 2 for the gate's sigmoid(0)), or, with
    no shared slices, a silent expert: fresh neurons whose up_proj rows are zero (gate_proj rows and down_proj
    columns small and random, as any fresh SwiGLU neuron, so it trains)."""
    ffn_map = plan.shared_map or AxisMap(plan.source.ffn, torch.full((plan.shared_ffn,), -1))
    opts = ApplyOptions(tied=False, rms_stream=True, seed=seed)
    return apply_tensor(x, spec, layer, sizes, _expert_maps(plan, layer, ffn_map), opts).contiguous()


def router_tensor(plan: UpcyclePlan, layer: int, std: float, seed: int) -> torch.Tensor:
    """The router of one layer: zeros, or one Gaussian row per copy of the FFN repeated over that copy's experts."""
    hidden = plan.source.hidden
    if plan.request.router == "zero":
        return torch.zeros(plan.request.experts, hidden)
    rows = torch.randn(plan.copies, hidden, generator=generator_for(seed, "router", layer)) * std
    return rows[torch.tensor(plan.router_groups)].contiguous()


def selected_router(x: torch.Tensor, plan: UpcyclePlan, layer: int) -> torch.Tensor:
    """A MoE source's router with the row of each new expert's source expert (`plan.layer_sources`): rows repeated
    for copies of an expert, left out for dropped ones."""
    return x.index_select(0, torch.tensor(plan.layer_sources[layer])).contiguous()


def shared_gate_tensor(plan: UpcyclePlan) -> torch.Tensor:
    """The shared expert's gate starts at zero: sigmoid(0) = 1/2 for every token, which its down_proj undoes."""
    return torch.zeros(1, plan.source.hidden)
