"""Mixture-of-experts targets of the Llama family: Mixtral, Qwen2-MoE and Qwen3-MoE.

Each keeps its dense sibling's attention, norms and embeddings and replaces every FFN by a router (`gate`, one row per
expert), E SwiGLU experts and, in Qwen2-MoE, one shared expert whose output a sigmoid gate scales. Tensors are named
in the per-expert layout the published checkpoints use (`experts.{e}.w1` in Mixtral, `experts.{e}.gate_proj` in the
Qwen MoEs): transformers 5 fuses them into 3-D tensors on load and splits them again on save, and older transformers,
vLLM and llama.cpp's converter read only this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
