"""µP learning-rate groups for continued training of a grown model (Adam rule, DESIGN.md section 4).

Why: an LR tuned on the small (pre-growth) model transfers to the grown one if every matrix-like parameter whose
fan-in grew by a factor m gets `lr / m` (`lr * base_fan_in / fan_in`); vectors, biases, norm gains and embeddings
keep `lr`. The base shapes come from instantiating the small model's config on the meta device (no memory, no
weights) and matching parameters by name; layers the base lacks (depth growth) use the base's per-layer shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from growkit.errors import GrowkitError

# Config fields that carry a width, per naming convention (GPT-2 style, Llama style, T5/BERT style).
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
_HEAD_KEYS = ("num_attention_heads", "n_head")
_KV_KEYS = ("num_key_value_heads",)


@dataclass(frozen=True)
class ParamInfo:
    """How one parameter is treated: its kind, fan-in now and in the base model, and its LR multiplier."""

    name: str
    kind: str  # "matrix" | "embedding" | "vector"
    fan_in: int | None
    base_fan_in: int | None
    lr_mult: float
    decay: bool


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except ImportError:  # pragma: no cover - very old/new transformers
        return ()


def fan_in_dim(module: nn.Module, param_name: str, param: torch.Tensor) -> int | None:
    """Which dimension of a parameter is its fan-in (input side), or None for vector-like parameters.

    GPT-2's Conv1D stores weights as [in, out], so its fan-in is dim 0; nn.Linear is [out, in] (dim 1); any
    other parameter with 2+ dims follows the torch convention (last dim is the input).
    """
    if param.ndim < 2:
        return None
    if isinstance(module, _conv1d_types()) and param_name == "weight":
        return 0
    return param.ndim - 1


def _owning_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Map each (deduplicated) parameter name to (owning module, local name)."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    for mod_name, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{mod_name}.{local}" if mod_name else local, (module, local))
    return owners


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_in = getattr(model, "get_input_embeddings", None)
    if callable(get_in):
        emb = get_in()
        if emb is not None and getattr(emb, "weight", None) is not None:
            ids.add(id(emb.weight))
    return ids


def _config_to_object(base_config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(base_config, PretrainedConfig):
        return base_config
    if isinstance(base_config, Mapping):
        cfg = dict(base_config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise GrowkitError("base config has no model_type; cannot build µP base shapes")
        for key in ("transformers_version", "architectures", "_name_or_path"):
            cfg.pop(key, None)
        return AutoConfig.for_model(model_type, **cfg)
    raise GrowkitError(f"base config must be a dict or a transformers config, not {type(base_config).__name__}")


def base_shapes(base_config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the base model, from its config alone (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    cfg = _config_to_object(base_config)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(cfg)
    return {name: tuple(p.shape) for name, p in base.named_parameters()}


def _match_base_name(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The base parameter that plays this parameter's role; layer i beyond the base maps to layer i mod L_base."""
    if name in shapes:
        return name
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        return None
    prefix, suffix = name[: m.start()], name[m.end():]
    indices = sorted({int(k[len(prefix) + 1:].split(".", 1)[0]) for k in shapes
                      if k.startswith(prefix + ".") and k[len(prefix) + 1:].split(".", 1)[0].isdigit()})
    if not indices:
        return None
    candidate = f"{prefix}.{indices[int(m.group(1)) % len(indices)]}.{suffix}"
    return candidate if candidate in shapes else None


def scaled_base_config(config: Any, base_width: int) -> dict:
    """The config of a narrower model of hidden size `base_width`: ffn and head counts scale by the same ratio.

    Used for `--base-width N` when a checkpoint has no growkit provenance. head_dim stays fixed.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    hkey = next((k for k in _HIDDEN_KEYS if cfg.get(k)), None)
    if hkey is None:
        raise GrowkitError("config has no hidden size field; cannot derive a base config from --base-width")
    hidden = int(cfg[hkey])
    if base_width <= 0 or base_width > hidden:
        raise GrowkitError(f"--base-width {base_width} must be between 1 and the model's hidden size {hidden}")
    ratio = hidden / base_width
    heads_key = next((k for k in _HEAD_KEYS if cfg.get(k)), None)
    if heads_key is not None:
        heads = int(cfg[heads_key])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        new_heads = round(heads / ratio)
        if new_heads < 1 or new_heads * head_dim != base_width:
            raise GrowkitError(f"--base-width {base_width} is not a whole number of heads of size {head_dim}")
        cfg[heads_key] = new_heads
        if cfg.get("head_dim"):
            cfg["head_dim"] = head_dim
        for k in _KV_KEYS:
            if cfg.get(k):
                cfg[k] = max(1, round(int(cfg[k]) / ratio))
    for k in _FFN_KEYS:
        if cfg.get(k):
            cfg[k] = max(1, round(int(cfg[k]) / ratio))
    cfg[hkey] = base_width
    return cfg


def mup_param_info(model: nn.Module, base_config: Any | None) -> list[ParamInfo]:
    """Per-parameter µP classification; with `base_config=None` every multiplier is 1 (plain training)."""
    shapes = base_shapes(base_config) if base_config is not None else None
    owners = _owning_modules(model)
    emb_ids = _embedding_param_ids(model)
    infos = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module, local = owners[name]
        if id(p) in emb_ids:
            infos.append(ParamInfo(name, "embedding", None, None, 1.0, decay=True))
            continue
        dim = fan_in_dim(module, local, p)
        if dim is None:
            infos.append(ParamInfo(name, "vector", None, None, 1.0, decay=False))
            continue
        fan_in = int(p.shape[dim])
        base_fan_in = None
        mult = 1.0
        if shapes is not None:
            base_name = _match_base_name(name, shapes)
            if base_name is not None and len(shapes[base_name]) == p.ndim:
                base_fan_in = int(shapes[base_name][dim])
                mult = base_fan_in / fan_in
        infos.append(ParamInfo(name, "matrix", fan_in, base_fan_in, mult, decay=True))
    return infos


def mup_param_groups(model: nn.Module, base_config: Any | None, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups implementing the µP Adam rule relative to `base_config` (dict or config).

    Matrix-like parameters get `lr * base_fan_in / fan_in` (fan-in along dim 0 for GPT-2 Conv1D, the last dim
    otherwise); vectors, biases, norms and embeddings keep `lr`. Weight decay applies to matrices and embeddings,
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
