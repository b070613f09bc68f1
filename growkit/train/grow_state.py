"""Growth inside training: the model and its Adam(W) state grown through the same axis maps (DESIGN.md section 2).

Why: a grown model that starts with a fresh optimizer loses the moments the small model built up and has to re-warm
its learning rate. Growth is linear in the parameters: a grown entry is P'[j] = s_j * P[src_j], each source entry
copied c times, so after an exact growth (clone) every copy's gradient is t * g[src] with t = 1 / (c * s). Adam then
continues the small model's trajectory exactly with exp_avg' = t * gather(exp_avg), exp_avg_sq' = t^2 *
gather(exp_avg_sq), the step count kept, and per tensor lr' = s * lr, eps' = t * eps, weight_decay' = wd / s
(decoupled, AdamW) or wd * t / s (Adam's L2 term). For readers s = 1/k: the µP rule, applied on top of whatever
multipliers the groups already had (`lr_mult` of growkit's µP groups is scaled the same way).

s and the copies come from the maps themselves (`apply_tensor` on a tensor of ones, `source_index`), so any
per-entry scale an operator chooses is carried. A parameter group holds one learning rate, so where s differs inside
one tensor (net2net's uneven multiplicities) the group gets the tensor's mean s (the µP value for a reader), the
moments still get each entry's own t, and the tensor is listed in `GrownTraining.uneven`: that continuation is close,
not exact.

Each grown group also gets the factor by which gradient clipping weighs its squares, so that the clip measures the
small model's norm (`grad_clip`).

Fresh neurons (copy-pad, fresh draws) and the zeroed residual writers of identity blocks get zero moments, the step
kept. New layers of depth growth copy a source layer's weights, so they copy its moments too: those are the best
estimate of the new layer's gradient scale, where zero moments under a late step count would make its first update
(1 - beta1) / sqrt(1 - beta2) times the usual size (3.2x with betas (0.9, 0.999)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from growkit.apply import ApplyOptions, apply_tensor, source_index
from growkit.arch.spec import Sizes, TensorSpec
from growkit.errors import GrowkitError
from growkit.maps import GrowthMaps
from growkit.pipeline import Growth, growth_of_model, grown_model
from growkit.train.freeze import Freeze, new_entries, new_layers, trainable_entries
from growkit.train.grad_clip import NORM_WEIGHT

#: Optimizer state entries scaled like the gradient (t) and like its square (t^2).
FIRST_MOMENTS = ("exp_avg",)
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
#: Parameter-group entries that are learning rates (or growkit's µP multiplier of one): all scale by s.
GROUP_LRS = ("lr", "initial_lr", "max_lr", "min_lr", "lr_mult")
#: Scheduler attributes holding one learning rate per group, and one other value per group.
SCHEDULER_LRS = ("base_lrs", "min_lrs", "max_lrs")
SCHEDULER_PER_GROUP = ("lr_lambdas",)


@dataclass
class EntryScale:
    """How one grown parameter's entries relate to the source parameter's."""

    src: torch.Tensor  # flat source index of each grown entry; -1 where it is fresh (or zeroed)
    t: torch.Tensor  # each entry's gradient factor 1 / (copies * s); 0 where fresh
    s: float  # the tensor's weight scale, for its group's learning rate (the mean where entries differ)
    t_group: float  # the tensor's gradient factor, for its group's eps
    uneven: bool  # entries have different s: the group's lr is only their mean
    norm_weight: torch.Tensor  # each entry's gradient-norm factor copies * s^2 = 1 / (copies * t^2) (`grad_clip`)


@dataclass
class GrownTraining:
    """The grown model, its optimizer with the carried state, the scheduler now driving it, and the growth."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    growth: Growth
    uneven: list[str] = field(default_factory=list)  # parameters whose group lr is a mean over uneven entries
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)  # entries that train, where `freeze` holds some


def entry_scale(spec: TensorSpec, layer: int | None, source_shape: torch.Size, sizes: Sizes,
                maps: GrowthMaps, opts: ApplyOptions) -> EntryScale:
    """s and t of every entry of one grown tensor, probed through the same apply path as the weights."""
    s = apply_tensor(torch.ones(source_shape), spec, layer, sizes, maps, replace(opts, noise_snr_db=None))
    src = source_index(spec, layer, sizes, maps)
    live = (src >= 0) & (s != 0)
    src = torch.where(live, src, -1)
    copies = torch.bincount(src[live], minlength=source_shape.numel())[src.clamp(min=0)]
    t = torch.where(live, 1.0 / (copies * s), 0.0)
    if not bool(live.any()):
        return EntryScale(src, t, 1.0, 1.0, False, torch.ones(src.shape))
    s_live, t_live = s[live], t[live]
    weight = copies * s * s
    weight = torch.where(live, weight, weight[live].mean())  # fresh entries: their tensor's mean (grad_clip)
    uneven = not (bool((s_live == s_live[0]).all()) and bool((t_live == t_live[0]).all()))
    if uneven:
        return EntryScale(src, t, float(s_live.double().mean()), float(t_live.double().mean()), True, weight)
    return EntryScale(src, t, float(s_live[0]), float(t_live[0]), False, weight)


def grown_norm_weight(old: float | torch.Tensor, scale: EntryScale) -> float | torch.Tensor:
    """The clip factor of a grown tensor: its source's factor (one per source entry, or one for all) times its own,
    a float where every entry has the same."""
    if torch.is_tensor(old):
        old = torch.where(scale.src >= 0, old.reshape(-1).cpu()[scale.src.clamp(min=0)], old.mean())
    weight = scale.norm_weight * old
    flat = weight.reshape(-1)
    return float(flat[0]) if bool((flat == flat[0]).all()) else weight


def carry_state(state: dict[str, Any], scale: EntryScale, shape: torch.Size) -> dict[str, Any]:
    """One parameter's Adam state mapped to its grown shape: moments gathered and scaled, the step kept."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value.clone() if torch.is_tensor(value) else value
            continue
        if key not in FIRST_MOMENTS and key not in SECOND_MOMENTS:
            raise GrowkitError(f"optimizer state {key!r} is not one growkit knows how to grow "
                               f"(known: {', '.join(FIRST_MOMENTS + SECOND_MOMENTS)}, step)")
        power = 1 if key in FIRST_MOMENTS else 2
        index, factor = scale.src.clamp(min=0).to(value.device), scale.t.to(value.device, value.dtype)
        out[key] = (value.reshape(-1)[index] * factor**power).reshape(shape)
    return out


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


def grown_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], s: float, t: float) -> dict[str, Any]:
    """The hyper-parameters of a group holding grown tensors with weight scale s and gradient factor t."""
    new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    for key in GROUP_LRS:
        if key in new:
            new[key] = new[key] * s
    if new.get("weight_decay"):
        new["weight_decay"] = new["weight_decay"] / s if _decoupled(optimizer, group) else new["weight_decay"] * t / s
    new["eps"] = new["eps"] * t
    return new


def carry_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, sources: list[tuple[int, float]]) -> None:
    """Point a torch LR scheduler at `optimizer`, whose group i came from old group `sources[i][0]` with its learning
    rates times `sources[i][1]`; the schedule's position (last_epoch) is kept. Chained schedulers are followed."""
    for inner in getattr(scheduler, "_schedulers", None) or []:
        carry_scheduler(inner, optimizer, sources)
    scheduler.optimizer = optimizer
    for name in SCHEDULER_LRS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            setattr(scheduler, name, [values[i] * s for i, s in sources])
    for name in SCHEDULER_PER_GROUP:
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            setattr(scheduler, name, [values[i] for i, _ in sources])
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@dataclass
class CarriedOptimizer:
    """`grow_optimizer`'s result: the optimizer, each group's (old group, lr factor), and per parameter its scales."""

    optimizer: torch.optim.Optimizer
    sources: list[tuple[int, float]]
    scales: dict[str, EntryScale]


def grow_optimizer(model: Any, optimizer: torch.optim.Optimizer, new_model: Any, growth: Growth) -> CarriedOptimizer:
    """A new optimizer of the same class over `new_model`'s parameters with `optimizer`'s state carried through
    `growth`: one group per tensor, in `named_parameters` order (so a checkpoint of it loads into groups built from
    the grown model alone)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise GrowkitError(f"growing the optimizer state needs Adam or AdamW, got {type(optimizer).__name__}")
    old = dict(model.named_parameters(remove_duplicate=False))  # an untied head's source is the tied embedding
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    specs = {entry.name: (spec, layer) for entry, spec, layer in growth.entries(torch.float32)}
    groups: list[dict[str, Any]] = []
    sources: list[tuple[int, float]] = []
    states: dict[torch.nn.Parameter, dict[str, Any]] = {}
    scales: dict[str, EntryScale] = {}
    for name, param in new_model.named_parameters():
        spec, layer = specs[name]
        source = old[spec.at(None if layer is None else growth.maps.layer_src[layer])]
        param.requires_grad_(source.requires_grad)
        if id(source) not in group_of:
            continue
        scale = scales[name] = entry_scale(spec, layer, source.shape, growth.plan.source, growth.maps, growth.opts)
        states[param] = carry_state(optimizer.state.get(source, {}), scale, param.shape)
        old_group = optimizer.param_groups[group_of[id(source)]]
        groups.append({**grown_group(optimizer, old_group, scale.s, scale.t_group), "params": [param],
                       NORM_WEIGHT: grown_norm_weight(old_group.get(NORM_WEIGHT, 1.0), scale),
                       **({"param_names": [name]} if "param_names" in old_group else {})})
        sources.append((group_of[id(source)], scale.s))
    new_optimizer = type(optimizer)(groups)
    new_optimizer.defaults = dict(optimizer.defaults)
    for param, state in states.items():
        new_optimizer.state[param] = state
    return CarriedOptimizer(new_optimizer, sources, scales)


def grow_training_state(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                        freeze: str = "none", **request: Any) -> GrownTraining:
    """Grow a `transformers` model in the middle of training, together with its Adam(W) state and LR scheduler.

    `request` takes `growkit.grow_model`'s options (width, hidden, ffn, heads, kv_heads, layers, method,
    depth_method, noise_snr_db, seed, operator_options) and `untie_head=True` (a tied head becomes a head of its own,
    the function kept exactly; head and embedding both start from the tied tensor's moments). `freeze` "old" trains
    only what growth added, "new" only what was there (`growkit.train.freeze`). Returns the grown model (on the
    source's device, in its train/eval mode), a new optimizer of the same class with the state carried (module
    docstring), and `scheduler` re-pointed at it with its position kept. Replace your references to the old model
    and optimizer with these.
    """
    trainable_entries(freeze, {})  # an unknown mode fails before any work
    if request.get("direction", "grow") != "grow":
        raise GrowkitError("grow_training_state only grows (shrinking has no optimizer state to carry)")
    growth = growth_of_model(model, **request)
    new_model = grown_model(growth).to(next(model.parameters()).device)
    new_model.train(model.training)
    carried = grow_optimizer(model, optimizer, new_model, growth)
    if scheduler is not None:
        carry_scheduler(scheduler, carried.optimizer, carried.sources)
    trainable: dict[str, torch.Tensor] = {}
    if freeze != "none":
        fresh_layers = new_layers(growth.maps.layer_src)
        layer_of = {entry.name: layer for entry, _, layer in growth.entries(torch.float32)}
        new = {name: new_entries(scale.src, layer_of[name] in fresh_layers) for name, scale in carried.scales.items()}
        trainable = trainable_entries(freeze, new)
        Freeze(new_model, carried.optimizer, trainable)
    uneven = [name for name, scale in carried.scales.items() if scale.uneven]
    return GrownTraining(new_model, carried.optimizer, scheduler, growth, uneven, trainable)
