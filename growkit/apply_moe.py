"""An upcycling plan x dense tensors -> expert, router and shared-expert tensors.

`growkit.apply` gathers and rescales each expert's slice of the dense FFN (an expert is one more axis map on `ffn`);
this module adds what lies across experts, which one tensor's maps cannot say: the router rows, noise that cancels
over the copies of a slice, and Drop-Upcycling's re-drawn neurons.
"""

from __future__ import annotations

import torch

from growkit.apply import ApplyOptions, apply_tensor, generator_for, stable_mean, stable_std
from growkit.arch.spec import FFN, Sizes, TensorSpec
from growkit.maps import AxisMap, GrowthMaps
from growkit.operators.upcycle import UpcyclePlan, reinit_positions


def _maps(plan: UpcyclePlan, layer: int, ffn_map: AxisMap) -> GrowthMaps:
    return GrowthMaps(hidden=AxisMap.identity(plan.source.hidden), per_layer={(FFN, layer): ffn_map},
                      layer_src=list(range(plan.source.layers)))


def _ffn_dim(spec: TensorSpec) -> int:
    return next(i for i, d in enumerate(spec.dims) if FFN in d.axes)


def expert_tensor(x: torch.Tensor, spec: TensorSpec, layer: int, plan: UpcyclePlan, expert: int,
                  sizes: Sizes, seed: int) -> torch.Tensor:
    """Routed expert `expert`'s value of a dense FFN tensor `x` (gate_proj, up_proj or down_proj) in `layer`."""
    ffn_map = plan.expert_maps[expert]
    y = apply_tensor(x, spec, layer, sizes, _maps(plan, layer, ffn_map), ApplyOptions(tied=False, rms_stream=True))
    dim = _ffn_dim(spec)
    reader = spec.dims[dim].role == "in"
    factor = float(ffn_map.reader_scale()[0]) if reader else 1.0
    request = plan.request
    if request.expert_noise_db is not None and reader:
        y = y.clone() if y.data_ptr() == x.data_ptr() else y
        y.add_(_copy_noise(x, y.shape, layer, expert, plan, seed), alpha=factor)
    if request.reinit_ratio > 0:
        positions = reinit_positions(plan, generator_for(seed, "reinit", layer, expert))
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
    return apply_tensor(x, spec, layer, sizes, _maps(plan, layer, ffn_map), opts).contiguous()


def router_tensor(plan: UpcyclePlan, layer: int, std: float, seed: int) -> torch.Tensor:
    """The router of one layer: zeros, or one Gaussian row per copy of the FFN repeated over that copy's experts."""
    hidden = plan.source.hidden
    if plan.request.router == "zero":
        return torch.zeros(plan.request.experts, hidden)
    rows = torch.randn(plan.copies, hidden, generator=generator_for(seed, "router", layer)) * std
    return rows[torch.tensor(plan.router_groups)].contiguous()


def duplicated_router(x: torch.Tensor, plan: UpcyclePlan) -> torch.Tensor:
    """A MoE source's router with each row repeated for every copy of its expert (`plan.router_groups`)."""
    return x.index_select(0, torch.tensor(plan.router_groups)).contiguous()


def shared_gate_tensor(plan: UpcyclePlan) -> torch.Tensor:
    """The shared expert's gate starts at zero: sigmoid(0) = 1/2 for every token, which its down_proj undoes."""
    return torch.zeros(1, plan.source.hidden)
