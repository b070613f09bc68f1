"""µP learning-rate groups for continued training of a grown model (Adam rule, DESIGN.md section 4).

Why: an LR tuned on the small (pre-growth) model transfers to the grown one if every matrix-like parameter whose
fan-in grew by a factor m gets `lr / m` (`lr * base_fan_in / fan_in`); vectors, biases, norm gains and embeddings
keep `lr`. Which dimension is a parameter's fan-in, and how large it is in the small model, both come from the
family's tensor specs (the dim whose role is "in", sized at the base config's sizes): nothing here knows a family,
a config field or a module class, and a layer the base lacks (depth growth) has the same per-layer shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

from torch import nn

from growkit.arch.moe import fused_parameter_names
from growkit.arch.registry import family_for
from growkit.arch.spec import Family, Sizes, TensorSpec
from growkit.errors import GrowkitError


@dataclass(frozen=True)
class ParamInfo:
    """How one parameter is treated: its kind, fan-in now and in the base model, and its LR multiplier."""

    name: str
    kind: str  # "matrix" | "embedding" | "vector"
    fan_in: int | None
    base_fan_in: int | None
    lr_mult: float
    decay: bool


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise GrowkitError(f"base config must be a dict or a transformers config, not {type(config).__name__}")


def _specs_by_name(family: Family, config: dict[str, Any], names: list[str]) -> dict[str, TensorSpec]:
    """Every tensor of a model with this config, by its name, with its spec."""
    layers = family.sizes(config).layers
    specs = {spec.at(layer): spec for spec in family.tensors(config, names)
             for layer in (range(layers) if spec.per_layer else [None])}
    # a MoE model in memory holds each layer's experts fused (growkit.arch.moe): each with its expert spec's fan-in
    specs.update({live: specs[ours] for live, ours in fused_parameter_names(config).items()})
    return specs


def _fan_in(spec: TensorSpec, sizes: Sizes) -> int | None:
    """Size of a tensor's reader (fan-in) dimensions at `sizes`; None for one that reads nothing (a vector)."""
    readers = [d for d in spec.dims if d.role == "in"]
    return math.prod(sizes.dim_size(d) for d in readers) if readers else None


def scaled_base_config(config: Any, base_width: int) -> dict:
    """The config of a narrower model of hidden size `base_width`: ffn and head counts scale by the same ratio.

    Used for `--base-width N` when a checkpoint has no growkit provenance. head_dim stays fixed.
    """
    cfg = _as_dict(config)
    family = family_for(cfg)
    sizes = family.sizes(cfg)
    if base_width <= 0 or base_width > sizes.hidden:
        raise GrowkitError(f"--base-width {base_width} must be between 1 and the model's hidden size {sizes.hidden}")
    heads = Fraction(sizes.heads * base_width, sizes.hidden)
    if heads.denominator != 1:
        raise GrowkitError(f"--base-width {base_width} is not a whole number of heads of size {sizes.head_dim} "
                           f"({sizes.heads} heads scale to {float(heads):g})")

    def scaled(n: int) -> int:
        return max(1, round(n * base_width / sizes.hidden))

    base = sizes.replace(hidden=base_width, heads=int(heads), kv_heads=scaled(sizes.kv_heads), ffn=scaled(sizes.ffn))
    return family.rewrite_config(cfg, base, list(range(sizes.layers)))


def mup_param_info(model: nn.Module, base_config: Any | None) -> list[ParamInfo]:
    """Per-parameter µP classification; with `base_config=None` every multiplier is 1 (plain training)."""
    config = model.config.to_dict()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    try:
        family = family_for(config, "model config")
    except GrowkitError:
        if base_config is not None:
            raise
        # No µP multipliers to compute: only weight decay depends on the kind (matrices and embeddings decay).
        return [ParamInfo(name, "matrix" if p.ndim >= 2 else "vector", None, None, 1.0, decay=p.ndim >= 2)
                for name, p in trained]
    sizes = family.sizes(config)
    base = None
    if base_config is not None:
        base_dict = _as_dict(base_config)
        if family_for(base_dict, "µP base config") is not family:
            raise GrowkitError(f"µP base config is a {base_dict.get('model_type')} model, not a {family.name} one")
        base = family.sizes(base_dict)
    specs = _specs_by_name(family, config, [name for name, _ in model.named_parameters()])
    infos = []
    for name, p in trained:
        spec = specs.get(name)
        if spec is None:
            raise GrowkitError(f"µP groups: parameter {name} is not one of the {family.name} family's tensors")
        fan_in = _fan_in(spec, sizes)
        if spec.kind == "embedding":
            infos.append(ParamInfo(name, "embedding", None, None, 1.0, decay=True))
        elif fan_in is None:
            infos.append(ParamInfo(name, "vector", None, None, 1.0, decay=False))
        else:
            base_fan_in = _fan_in(spec, base) if base is not None else None
            mult = base_fan_in / fan_in if base_fan_in is not None else 1.0
            infos.append(ParamInfo(name, "matrix", fan_in, base_fan_in, mult, decay=True))
    return infos


def mup_param_groups(model: nn.Module, base_config: Any | None, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups implementing the µP Adam rule relative to `base_config` (dict or config).

    Matrix-like parameters get `lr * base_fan_in / fan_in` (the fan-in is the spec's reader dimension, whatever the
    storage layout: GPT-2's Conv1D keeps it on dim 0); vectors, biases, norms and embeddings keep `lr`. Weight decay applies to matrices and embeddings,
    not to vectors. Each group carries `lr_mult` and `param_names` for inspection; pass the list straight to
    `torch.optim.AdamW`. Build the groups before `accelerator.prepare` (FSDP flattens shapes).
    """
    by_name = dict(model.named_parameters())
    buckets: dict[tuple[float, bool], list[ParamInfo]] = {}
    for info in mup_param_info(model, base_config):
        buckets.setdefault((round(info.lr_mult, 12), info.decay), []).append(info)
    groups = []
    for (mult, decay), infos in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        groups.append({
            "params": [by_name[i.name] for i in infos],
            "lr": lr * mult,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_mult": mult,
            "param_names": [i.name for i in infos],
        })
    return groups


def describe_groups(groups: list[dict]) -> str:
    """One line per group: multiplier, decay, number of tensors and parameters (for logs)."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"lr x{g.get('lr_mult', 1.0):.4g} wd {g['weight_decay']:g}: {len(g['params'])} tensors, {n:,} params")
    return "; ".join(lines)
