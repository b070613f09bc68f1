"""Families keyed by `model_type`; the only place that knows which architectures growkit supports."""

from __future__ import annotations

from typing import Any

from growkit.arch.gemma import GemmaFamily
from growkit.arch.gpt2 import GPT2Family
from growkit.arch.gpt_neox import GPTNeoXFamily
from growkit.arch.granite import GraniteFamily
from growkit.arch.llama import LlamaFamily
from growkit.arch.moe import MoeFamily
from growkit.arch.olmo2 import Olmo2Family
from growkit.arch.opt import OPTFamily
from growkit.arch.phi3 import Phi3Family
from growkit.arch.spec import Family, HeadsUnknown
from growkit.arch.starcoder2 import Starcoder2Family
from growkit.errors import GrowkitError

#: Config inference tries them in order: StarCoder2 before Llama (a bare file's names are Llama's plus `mlp.c_fc`),
#: OLMo2 before Llama (whose q_proj/q_norm names it shares)
FAMILIES: tuple[Family, ...] = (GPT2Family(), Starcoder2Family(), Olmo2Family(), LlamaFamily(), GPTNeoXFamily(),
                                OPTFamily(), GemmaFamily(), GraniteFamily(), Phi3Family(),
                                MoeFamily())


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(config: dict[str, Any], source: str = "config") -> Family:
    """The family for a config's model_type, or an error listing the supported ones."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise GrowkitError(
        f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")


def infer_config(shapes: dict[str, tuple[int, ...]], source: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A config inferred from tensor names and shapes, for a bare .safetensors file without one, with the fields
    no tensor records (left to transformers' defaults). Refused where the shapes leave the head count open."""
    for family in FAMILIES:
        try:
            config = family.infer_config(shapes)
        except HeadsUnknown as exc:
            raise GrowkitError(f"{source}: cannot infer a {family.name} config: {exc}; pass --config CONFIG.json "
                               "with the model's head counts") from None
        except (KeyError, ValueError, TypeError, IndexError, ArithmeticError) as exc:
            # The names look like this family's, but a tensor that inference needs is absent or oddly shaped.
            what = f"tensor {exc.args[0]} is missing" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise GrowkitError(f"{source}: cannot infer a {family.name} config from its tensors ({what}); "
                               "pass --config CONFIG.json") from None
        if config is not None:
            return config, family.unrecorded
    raise GrowkitError(
        f"{source}: no config in the file's metadata or beside it, and its tensor names match no supported "
        f"architecture ({', '.join(supported_model_types())}); pass --config CONFIG.json")


def stored_names(names: list[str]) -> dict[str, str]:
    """{name growkit uses: name in the file} for a file whose family spells its tensor names another way."""
    for family in FAMILIES:
        renames = family.stored_names(names)
        if renames:
            return renames
    return {}
