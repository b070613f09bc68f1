"""The Llama family (Llama, Mistral, Qwen2, Qwen3): torch Linear `[out, in]`, GQA, RoPE, SwiGLU, RMSNorm."""

from __future__ import annotations

import math
import re
from typing import Any

from growkit.arch.spec import (
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, VOCAB, Dim, Family, Norm, Sizes, TensorSpec, head, heads_not_in_shapes,
    linear,
)
from growkit.errors import GrowkitError

_Q = (KV_HEADS, QGROUP, HEAD_DIM)
_KV = (KV_HEADS, HEAD_DIM)
#: Every norm, Qwen3's per-head q/k norms included, is an RMSNorm reading the one `rms_norm_eps`
#: The RMSNorm of the Llama layout (also Phi-3's and OLMo2's): its eps in `rms_norm_eps`
RMS_NORM = Norm("rms", eps_key="rms_norm_eps")

#: model_type -> (q/k/v always carry a bias, per-head q/k RMSNorm)
_VARIANTS = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


class LlamaFamily(Family):
    def __init__(self) -> None:
        super().__init__(name="llama", model_types=tuple(_VARIANTS), ignorable=(".rotary_emb.inv_freq",),
                         unrecorded=("rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings"))

    def sizes(self, config: dict[str, Any]) -> Sizes:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise GrowkitError(f"config: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
        return Sizes(hidden=hidden, ffn=int(config["intermediate_size"]), heads=heads, kv_heads=kv_heads,
                     layers=int(config["num_hidden_layers"]), head_dim=head_dim, vocab=int(config["vocab_size"]),
                     positions=int(config.get("max_position_embeddings", 0)))

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", False))

    def variant(self, config: dict[str, Any]) -> tuple[bool, bool]:
        """(q/k/v always carry a bias, per-head q/k RMSNorm) of the config's model type."""
        return _VARIANTS[config["model_type"]]

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        qkv_bias, qk_norm = self.variant(config)
        qkv_bias = qkv_bias or bool(config.get("attention_bias", False))
        o_bias = bool(config.get("attention_bias", False))
        mlp_bias = bool(config.get("mlp_bias", False))
        a, m = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
        hid_in, hid_out = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out")

        layer = [
            TensorSpec("model.layers.{}.input_layernorm.weight", (Dim((HIDDEN,), "elem"),), "norm_weight", per_layer=True,
                       norm=RMS_NORM),
            *linear(a + "q_proj", Dim(_Q, "out", gated=True), hid_in, qkv_bias),
            *linear(a + "k_proj", Dim(_KV, "out", gated=True), hid_in, qkv_bias),
            *linear(a + "v_proj", Dim(_KV, "out"), hid_in, qkv_bias),
            *linear(a + "o_proj", hid_out, Dim(_Q, "in"), o_bias),
            TensorSpec("model.layers.{}.post_attention_layernorm.weight", (Dim((HIDDEN,), "elem"),), "norm_weight",
                       per_layer=True, norm=RMS_NORM),
            *linear(m + "gate_proj", Dim((FFN,), "out", gated=True), hid_in, mlp_bias),
            *linear(m + "up_proj", Dim((FFN,), "out"), hid_in, mlp_bias),
            *linear(m + "down_proj", hid_out, Dim((FFN,), "in"), mlp_bias),
        ]
        if qk_norm:
            layer += [TensorSpec(a + f"{x}_norm.weight", (Dim((HEAD_DIM,), "elem"),), "norm_weight", per_layer=True,
                                 norm=RMS_NORM)
                      for x in ("q", "k")]
        return self.around(config, layer)

    def around(self, config: dict[str, Any], layer: list[TensorSpec]) -> list[TensorSpec]:
        """A layer's tensor templates between the embedding and the final norm (then the head, when untied): the
        ends every family of this layout shares, whatever its layers hold."""
        specs = [
            TensorSpec("model.embed_tokens.weight", (Dim((VOCAB,), "elem"), Dim((HIDDEN,), "out")), "embedding"),
            *layer,
            TensorSpec("model.norm.weight", (Dim((HIDDEN,), "elem"),), "norm_weight", final_norm=True, norm=RMS_NORM),
        ]
        return specs + head(self.tied(config))

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        new = dict(config)
        new.update(hidden_size=target.hidden, intermediate_size=target.ffn, num_attention_heads=target.heads,
                   num_key_value_heads=target.kv_heads, num_hidden_layers=target.layers, head_dim=target.head_dim)
        if isinstance(config.get("layer_types"), list):
            new["layer_types"] = [config["layer_types"][s] for s in layer_src]
        if isinstance(config.get("max_window_layers"), int) and config.get("num_hidden_layers"):
            old_layers = int(config["num_hidden_layers"])
            new["max_window_layers"] = min(target.layers, config["max_window_layers"] * target.layers // old_layers)
        return new

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        q = "model.layers.0.self_attn.q_proj.weight"
        if "model.embed_tokens.weight" not in shapes or q not in shapes:
            return None
        vocab, hidden = shapes["model.embed_tokens.weight"]
        q_out, kv_out = shapes[q][0], shapes["model.layers.0.self_attn.k_proj.weight"][0]
        layers = 1 + max(int(mt.group(1)) for n in shapes if (mt := re.match(r"model\.layers\.(\d+)\.", n)))
        model_type = "qwen2" if "model.layers.0.self_attn.q_proj.bias" in shapes else (
            "qwen3" if "model.layers.0.self_attn.q_norm.weight" in shapes else "llama")
        if model_type != "qwen3":  # only Qwen3's per-head q/k norms have head_dim as a shape
            raise heads_not_in_shapes(q_out, math.gcd(q_out, kv_out))
        head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
        return {
            "model_type": model_type, "architectures": [_ARCHITECTURES[model_type]], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
            "num_attention_heads": q_out // head_dim, "num_key_value_heads": kv_out // head_dim, "head_dim": head_dim,
            "num_hidden_layers": layers, "tie_word_embeddings": "lm_head.weight" not in shapes,
            "mlp_bias": "model.layers.0.mlp.up_proj.bias" in shapes,
            "attention_bias": "model.layers.0.self_attn.o_proj.bias" in shapes,
        }
