"""Configs as the installed transformers reads them, checked before a tensor is read.

A config growkit reads must be one transformers accepts, and a config it writes must be one that transformers
accepts *and* reads back as the sizes that were planned. Both go through the family's own transformers config class
(`AutoConfig.for_model`), so its strict field types and its validators (`validate_architecture`,
`validate_layer_type`, ...) decide, for every family, current and future. On top: the few values transformers lets
through that no model can use (a NaN norm epsilon, a non-positive size).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

from growkit.arch.spec import Family, Sizes, norm_eps_keys
from growkit.errors import GrowkitError

#: Sizes under the names every transformers config answers to (GPT-2's `attribute_map` maps them to n_embd, ...).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "num_hidden_layers", "head_dim", "max_position_embeddings")
#: How many candidates each search for sizes that pass may try (each costs a transformers config, about a ms).
_MAX_TRIES = 64


def _built(config: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The transformers config object for `config`, or None and transformers' refusal in one line, naming the rule:
    `LlamaConfig.validate_architecture: The hidden size (768) is not a multiple of ...`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = {k: v for k, v in config.items() if k != "transformers_version"}
    try:
        built = AutoConfig.for_model(**fields)
        built.to_dict()  # what save_pretrained writes and from_pretrained reads back must work too
        return built, None
    except StrictDataclassError as exc:  # "Validation error for field 'x':" / "... for validator 'validate_x':"
        cls = CONFIG_MAPPING[config["model_type"]].__name__
        where = re.search(r"(field|validator) '(\w+)'", str(exc))
        rule = f"{cls}.{where.group(2)}" if where else cls
        return None, f"{rule}: {exc.__cause__ or exc}"
    except Exception as exc:  # noqa: BLE001 - whatever a config class raises on a malformed value is a refusal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}"


def size_type_problem(config: Mapping[str, Any]) -> str | None:
    """A size in the file that is not a whole number (`4.5`, `true`, `"32"`), named as the file spells it; checked
    on the raw values, before anything is built from them (a plain `int()` would turn 4.5 into 4 and true into 1)."""
    from transformers import CONFIG_MAPPING

    spelled = CONFIG_MAPPING[config["model_type"]].attribute_map  # GPT-2: hidden_size -> n_embd
    for key in (spelled.get(name, name) for name in _SIZES):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{key} is {json.dumps(value)}; it must be a whole number"
    return None


def config_problem(family: Family, config: Mapping[str, Any]) -> str | None:
    """Why `config` cannot be used (transformers' refusal, or a value no model can run with); None when it can."""
    return _checked(family, config)[1]


def _checked(family: Family, config: Mapping[str, Any]) -> tuple[Any, str | None]:
    built, refusal = _built(config)
    if built is None:
        return None, f"transformers {_version()} refuses it ({refusal})"
    own_name = type(built).attribute_map  # standard name -> the family's (GPT-2: hidden_size -> n_embd)
    for name in _SIZES:
        value = getattr(built, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            return built, f"{own_name.get(name, name)} is {value!r}; it must be a positive integer"
    for key in norm_eps_keys(family.tensors(built.to_dict(), [])):
        eps = getattr(built, key, None)
        if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                                    and math.isfinite(eps) and eps > 0):
            return built, f"{key} is {eps!r}; it must be a finite positive number"
    return built, None


def check_source_config(family: Family, config: Mapping[str, Any], source: str) -> None:
    """Refuse a source config transformers would not load, or one whose values no model can run with. Called once
    the tensors are known to match the config's sizes, so that no size handed to transformers is absurd (a config
    claiming 10**12 layers makes some config classes build a list that long)."""
    problem = config_problem(family, config)
    if problem is not None:
        raise GrowkitError(f"{source}: config: {problem}")


def target_problem(family: Family, config: Mapping[str, Any], target: Sizes) -> str | None:
    """Why the config of a model of `target` sizes would not load as that model in transformers; None when it would.

    It must pass transformers' validation, and transformers must read it back as exactly the planned sizes (a
    family whose config derives head_dim from hidden / heads cannot hold every combination). Checked before an
    operator has chosen the layer map, with a stand-in: only the length of per-layer config lists depends on it."""
    source_layers = family.sizes(config).layers
    layer_src = [i * source_layers // target.layers for i in range(target.layers)]
    built, problem = _checked(family, family.rewrite_config(dict(config), target, layer_src))
    if problem is not None:
        return problem
    try:
        read = family.sizes(built.to_dict()).as_dict()
    except GrowkitError as exc:
        return str(exc).removeprefix("config: ")
    wanted = target.as_dict()
    wrong = [f"{k} {read[k]} (not {wanted[k]})" for k in wanted if read[k] != wanted[k]]
    if wrong:
        return f"transformers' {type(built).__name__} reads these sizes as {', '.join(wrong)}"
    return None


def _version() -> str:
    import transformers

    return transformers.__version__


def nearest_passing(source: Sizes, target: Sizes, passes: Callable[[dict[str, int]], bool]) -> list[dict[str, int]]:
    """Requests close to `target` that pass, as the options that change: other head counts at the same hidden size
    (nearest to the heads scaled with hidden), the nearest hidden sizes below and above at the same heads, and the
    nearest hidden sizes below and above that hold a whole number of the source's heads where no hidden size passes
    at the same heads (configs that derive head_dim from hidden / heads). Each search tries a bounded number."""
    def first(candidates: Iterator[dict[str, int]]) -> dict[str, int] | None:
        hit = next((c for c in islice(candidates, _MAX_TRIES) if passes(c)), None)
        return None if hit is None else {k: v for k, v in hit.items() if v != getattr(target, k)}

    found = [first(_head_candidates(source, target))]
    for side in (-1, 1):
        found.append(first({"hidden": h} for h in _hidden_sizes(target.hidden, side, 1, source.hidden)) or
                     first({"hidden": h, **_heads_near(source, h // source.head_dim)}
                           for h in _hidden_sizes(target.hidden, side, source.head_dim, source.hidden)))
    return [c for i, c in enumerate(found) if c and c not in found[:i]]


def _hidden_sizes(hidden: int, side: int, step: int, source_hidden: int) -> Iterator[int]:
    """Multiples of `step` from `hidden` outwards on one side, skipping the source's own size."""
    start = (hidden // step + (side > 0)) * step if hidden % step else hidden + side * step
    for h in range(start, start + side * step * _MAX_TRIES, side * step):
        if h <= 0:
            return
        if h != source_hidden:
            yield h


def _heads_near(source: Sizes, heads: int) -> dict[str, int]:
    """`heads` with the kv head count that keeps the source's GQA ratio as nearly as a divisor of `heads` can."""
    ideal_kv = heads * source.kv_heads / source.heads
    kv = next((k for k in _outwards(ideal_kv) if k <= heads and heads % k == 0), heads)
    return {"heads": heads, "kv_heads": kv}


def _head_candidates(source: Sizes, target: Sizes) -> Iterator[dict[str, int]]:
    for heads in _outwards(source.heads * target.hidden / source.hidden):
        candidate = _heads_near(source, heads)
        if (candidate["heads"], candidate["kv_heads"]) != (target.heads, target.kv_heads):
            yield candidate


def _outwards(ideal: float) -> Iterator[int]:
    """Positive integers by distance from `ideal` (the lower first on a tie), at most `_MAX_TRIES` of them: sizes in
    a config can be absurd (10**30), so nothing here may scale with them."""
    below, above = math.floor(ideal), math.floor(ideal) + 1
    for _ in range(_MAX_TRIES):
        if below >= 1 and (ideal - below <= above - ideal):
            yield below
            below -= 1
        else:
            yield above
            above += 1


def as_options(changes: dict[str, int]) -> str:
    """`{"heads": 12, "kv_heads": 4}` -> `--heads 12 --kv-heads 4`."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
