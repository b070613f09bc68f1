"""Mixture-of-experts targets of the Llama family: Mixtral, Qwen2-MoE and Qwen3-MoE.

Each keeps its dense sibling's attention, norms and embeddings and replaces every FFN by a router (`gate`, one row per
expert), E SwiGLU experts and, in Qwen2-MoE, one shared expert whose output a sigmoid gate scales. Tensors are named
in the per-expert layout the published checkpoints use (`experts.{e}.w1` in Mixtral, `experts.{e}.gate_proj` in the
Qwen MoEs): transformers 5 fuses them into 3-D tensors on load and splits them again on save, and older transformers,
vLLM and llama.cpp's converter read only this layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from growkit.arch.llama import LlamaFamily
from growkit.arch.spec import FFN, HIDDEN, Dim, Sizes, TensorSpec
from growkit.errors import GrowkitError

#: A SwiGLU FFN's three projections as the dense Llama family names them, in the order gate, up, down.
DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeLayout:
    """Where one MoE family keeps its router and experts, and how its config names them."""

    model_type: str
    architecture: str
    dense_types: tuple[str, ...]  # dense model types that upcycle into this family
    block: str  # prefix of the MoE block's tensors, `{}` for the layer
    projections: tuple[str, str, str]  # an expert's gate, up and down projection names
    experts_key: str  # config field: number of routed experts
    ffn_key: str  # config field: intermediate size of one expert
    shared: bool  # a shared expert with a sigmoid gate beside the routed ones
    topk_norm_key: str | None  # config field that switches renormalised top-k weights; None: always renormalised

    def router(self) -> str:
        return self.block + "gate.weight"

    def expert(self, e: int, projection: str) -> str:
        """The name of expert `e`'s tensor for a dense projection name (`gate_proj`, `up_proj`, `down_proj`)."""
        return self.block + f"experts.{e}.{self.projections[DENSE_PROJECTIONS.index(projection)]}.weight"

    def shared_expert(self, projection: str) -> str:
        return self.block + f"shared_expert.{projection}.weight"

    def shared_gate(self) -> str:
        return self.block + "shared_expert_gate.weight"


LAYOUTS: dict[str, MoeLayout] = {
    "mixtral": MoeLayout("mixtral", "MixtralForCausalLM", ("llama", "mistral"), "model.layers.{}.block_sparse_moe.",
                         ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", False, None),
    "qwen2_moe": MoeLayout("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2",), "model.layers.{}.mlp.",
                           DENSE_PROJECTIONS, "num_experts", "moe_intermediate_size", True, "norm_topk_prob"),
    "qwen3_moe": MoeLayout("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "model.layers.{}.mlp.",
                           DENSE_PROJECTIONS, "num_experts", "moe_intermediate_size", False, "norm_topk_prob"),
}

#: Dense config fields the MoE config classes do not have (Llama's MLP bias and tensor-parallel split).
_DENSE_ONLY = ("mlp_bias", "pretraining_tp", "architectures", "transformers_version")


def targets_for(dense_type: str) -> list[str]:
    """The MoE families a dense model type upcycles into."""
    return [t for t, layout in LAYOUTS.items() if dense_type in layout.dense_types]


def dense_projection(name: str) -> str | None:
    """`gate_proj`, `up_proj` or `down_proj` for a dense Llama-family FFN weight name template, else None."""
    for projection in DENSE_PROJECTIONS:
        if name.endswith(f".mlp.{projection}.weight"):
            return projection
    return None


def moe_config(dense: dict[str, Any], layout: MoeLayout, *, experts: int, top_k: int, expert_ffn: int,
               shared_ffn: int, normalise_topk: bool) -> dict[str, Any]:
    """The MoE model's config: the dense config's attention, norms, RoPE and vocabulary kept, the FFN replaced.

    Every layer is sparse (`decoder_sparse_step` 1, no `mlp_only_layers`); the router's jitter noise is off, so the
    model computes at step 0 what the weights say.
    """
    config = {k: v for k, v in dense.items() if k not in _DENSE_ONLY}
    config.update(model_type=layout.model_type, architectures=[layout.architecture], num_experts_per_tok=top_k,
                  output_router_logits=False)
    config[layout.experts_key] = experts
    config[layout.ffn_key] = expert_ffn
    if layout.topk_norm_key is not None:
        config[layout.topk_norm_key] = normalise_topk
    if layout.model_type == "mixtral":
        config["router_jitter_noise"] = 0.0
        config.pop("attention_bias", None)
    else:
        config.update(decoder_sparse_step=1, mlp_only_layers=[])
    if layout.model_type == "qwen2_moe":
        config["shared_expert_intermediate_size"] = shared_ffn
        config["qkv_bias"] = True  # Qwen2's q/k/v always carry a bias; Qwen2-MoE makes it a switch
        config.pop("attention_bias", None)
    return config


# --- MoE checkpoints as sources: the family growkit grows -------------------------------------------------------

#: Routed experts of a layer: the router's rows; never resized by `grow` (a map on it would have to say which
#: expert each new one copies, which is a choice of tensors, not of positions inside one).
EXPERTS = "experts"
#: Qwen2-MoE's shared expert held as blocks of one routed expert's size: (shared_blocks x ffn), so growing `ffn`
#: grows the shared expert alike, block by block.
SHARED_BLOCKS = "shared_blocks"
#: A shared expert whose size is not a whole number of expert sizes: kept as it is.
SHARED_FFN = "shared_ffn"


@dataclass(frozen=True)
class MoeSizes(Sizes):
    """A MoE model's sizes: `ffn` is one routed expert's; `shared_blocks` or `shared_fixed` sizes the shared expert."""

    experts: int = 1
    shared_blocks: int = 0
    shared_fixed: int = 0

    def axis(self, kind: str) -> int:
        extra = {EXPERTS: self.experts, SHARED_BLOCKS: self.shared_blocks, SHARED_FFN: self.shared_fixed}
        return extra[kind] if kind in extra else super().axis(kind)

    @property
    def shared_ffn(self) -> int:
        return self.shared_blocks * self.ffn or self.shared_fixed

    def as_dict(self) -> dict[str, int]:
        shared = {"shared_ffn": self.shared_ffn} if self.shared_ffn else {}
        return {**super().as_dict(), "experts": self.experts, **shared}


#: model_type of the dense sibling whose attention, norms and embeddings a MoE family has
_ATTENTION_OF = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}


class MoeFamily(LlamaFamily):
    """Mixtral, Qwen2-MoE, Qwen3-MoE read in the per-expert layout: the Llama family's tensors with each FFN replaced
    by a router, E experts on the `ffn` axis (one routed expert's size) and the shared expert."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.model_types = "moe", tuple(LAYOUTS)

    @staticmethod
    def experts(config: dict[str, Any]) -> int:
        layout = LAYOUTS[config["model_type"]]
        # transformers 5 writes Qwen3-MoE's count as num_local_experts; the published configs say num_experts
        return int(config.get(layout.experts_key) or config["num_local_experts"])

    def _dense_view(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config as its dense sibling's, so the Llama family's attention and norms apply unchanged."""
        layout = LAYOUTS[config["model_type"]]
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
            raise GrowkitError("config: some layers are dense (mlp_only_layers / decoder_sparse_step); growkit reads "
                               "MoE models whose every layer is sparse")
        dense = dict(config, model_type=_ATTENTION_OF[layout.model_type], intermediate_size=config[layout.ffn_key])
        if layout.model_type == "qwen2_moe" and not config.get("qkv_bias", True):
            dense.update(model_type="llama", attention_bias=False)
        return dense

    def sizes(self, config: dict[str, Any]) -> Sizes:
        base = super().sizes(self._dense_view(config))
        shared = int(config.get("shared_expert_intermediate_size") or 0) if LAYOUTS[config["model_type"]].shared else 0
        whole = shared % base.ffn == 0
        return MoeSizes(**{f: getattr(base, f) for f in ("hidden", "ffn", "heads", "kv_heads", "layers", "head_dim",
                                                           "vocab", "positions")},
                        experts=self.experts(config), shared_blocks=shared // base.ffn if whole else 0,
                        shared_fixed=0 if whole else shared)

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        layout = LAYOUTS[config["model_type"]]
        specs = [s for s in super().tensors(self._dense_view(config), names) if dense_projection(s.name) is None]
        hid_in, hid_out = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out")
        moe = [TensorSpec(layout.router(), (Dim((EXPERTS,), "elem"), hid_in), per_layer=True)]
        ffn: dict[str, tuple[str, ...]] = {f"e{e}": (FFN,) for e in range(self.experts(config))}
        if layout.shared:
            shared = self.sizes(config)
            ffn["shared"] = (SHARED_BLOCKS, FFN) if shared.shared_blocks else (SHARED_FFN,)  # type: ignore[union-attr]
        for who, axes in ffn.items():
            def name(projection: str) -> str:
                return layout.shared_expert(projection) if who == "shared" else layout.expert(int(who[1:]), projection)
            moe += [TensorSpec(name("gate_proj"), (Dim(axes, "out", gated=True), hid_in), per_layer=True),
                    TensorSpec(name("up_proj"), (Dim(axes, "out"), hid_in), per_layer=True),
                    TensorSpec(name("down_proj"), (hid_out, Dim(axes, "in")), per_layer=True)]
        if layout.shared:
            moe.append(TensorSpec(layout.shared_gate(), (Dim((), "elem"), hid_in), per_layer=True))
        final = [s for s in specs if not s.per_layer]
        return [final[0], *[s for s in specs if s.per_layer], *moe, *final[1:]]

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        layout = LAYOUTS[config["model_type"]]
        new = super().rewrite_config(config, target, layer_src)
        new["intermediate_size"] = config["intermediate_size"]  # the Qwen MoEs' dense-layer size; none is dense
        new[layout.ffn_key] = target.ffn
        if layout.shared and isinstance(target, MoeSizes):
            new["shared_expert_intermediate_size"] = target.shared_ffn
        return new

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        return None  # a bare MoE file needs --config: its tensor names do not say which MoE family it is


def grouped_mm_note(expert_ffn: int, dtype: torch.dtype) -> str | None:
    """transformers 5's default expert kernel on CPU (`grouped_mm`) refuses expert rows whose byte length is not a
    multiple of 16 ("strides should be multiple of 16 bytes"): such a model loads but does not run until it is loaded
    with `experts_implementation="eager"`. Said, not refused: the checkpoint itself is right."""
    if expert_ffn * dtype.itemsize % 16 == 0:
        return None
    return (f"experts of {expert_ffn} neurons in {str(dtype).removeprefix('torch.')} are not a multiple of 16 bytes: "
            "transformers' default grouped_mm expert kernel refuses them; load the model with "
            "experts_implementation=\"eager\"")


def expert_kernel_note(config: dict[str, Any], dtype: torch.dtype) -> str | None:
    """`grouped_mm_note` for a written config: None unless it is a MoE model whose expert rows the kernel refuses."""
    layout = LAYOUTS.get(config.get("model_type", ""))
    return None if layout is None else grouped_mm_note(int(config[layout.ffn_key]), dtype)


def fused_parameter_names(config: dict[str, Any]) -> dict[str, str]:
    """{parameter name in a transformers 5 MoE model: the per-expert spec name with the same fan-in}: the fused expert
    tensors (all of a layer's experts in one, `mlp.experts.gate_up_proj` reading `hidden` as each expert's gate_proj
    does, `mlp.experts.down_proj` reading one expert's `ffn`) and the router (Mixtral's is `mlp.gate` in memory).
    Empty for other configs."""
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        return {}
    names = {}
    for layer in range(int(config["num_hidden_layers"])):
        fused = f"model.layers.{layer}.mlp."
        names[fused + "experts.gate_up_proj"] = layout.expert(0, "gate_proj").format(layer)
        names[fused + "experts.down_proj"] = layout.expert(0, "down_proj").format(layer)
        names[fused + "gate.weight"] = layout.router().format(layer)
    return names


def fused_experts(config: dict[str, Any], tensors: Iterator[tuple[str, torch.Tensor]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert tensors -> the fused 3-D tensors a transformers 5 MoE model holds (`mlp.experts.gate_up_proj`
    [E, 2 ffn, hidden], gate rows first, and `mlp.experts.down_proj` [E, hidden, ffn]; Mixtral's `block_sparse_moe`
    is `mlp` there), each layer's yielded once its last expert tensor has passed. Other configs: unchanged."""
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        yield from tensors
        return
    experts = MoeFamily.experts(config)
    pattern = re.compile(re.escape(layout.block).replace(r"\{\}", r"(\d+)") + r"experts\.(\d+)\.(\w+)\.weight")
    pending: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in tensors:
        m = pattern.fullmatch(name)
        if m is None:
            yield name.replace(".block_sparse_moe.", ".mlp."), tensor
            continue
        layer = int(m.group(1))
        got = pending.setdefault(layer, {})
        got[(int(m.group(2)), m.group(3))] = tensor
        if len(got) == 3 * experts:
            gate, up, down = layout.projections
            prefix = f"model.layers.{layer}.mlp.experts."
            yield prefix + "gate_up_proj", torch.stack([torch.cat([got[(e, gate)], got[(e, up)]]) for e in range(experts)])
            yield prefix + "down_proj", torch.stack([got[(e, down)] for e in range(experts)])
            del pending[layer]
    yield from ((f"{layout.block.format(layer)}experts.{e}.{p}.weight", t)
                for layer, got in pending.items() for (e, p), t in got.items())  # incomplete: reported as unexpected


def expert_modules(config: dict[str, Any]) -> list[str]:
    """Each layer's fused expert module in a transformers 5 MoE model (`model.layers.L.mlp.experts`, called with the
    hidden states, each token's top-k expert indices and weights), in layer order."""
    return [name.removesuffix(".down_proj") for name in fused_parameter_names(config)
            if name.endswith(".experts.down_proj")]
