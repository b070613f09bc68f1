"""StarCoder2: Llama's attention (GQA, RoPE, separate q/k/v/o) with a bias on every projection (`use_bias`), a
plain two-matrix MLP (`c_fc`, `c_proj`) and LayerNorm with bias."""

from __future__ import annotations

import math
from typing import Any

from growkit.arch.spec import (
    LAYERNORM_STREAM,
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, VOCAB, Dim, Family, Sizes, TensorSpec, head, heads_not_in_shapes,
    layer_norm, linear,
)
from growkit.errors import GrowkitError

_Q = (KV_HEADS, QGROUP, HEAD_DIM)
_KV = (KV_HEADS, HEAD_DIM)
_FC = "model.layers.0.mlp.c_fc.weight"  # the name that tells a StarCoder2 file from a Llama one


_EPS = "norm_epsilon"
LIMITS = LAYERNORM_STREAM


class Starcoder2Family(Family):
    def __init__(self) -> None:
        super().__init__(name="starcoder2", model_types=("starcoder2",), limits=LIMITS,
                         ignorable=(".rotary_emb.inv_freq",))

    def sizes(self, config: dict[str, Any]) -> Sizes:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise GrowkitError(f"config: num_attention_heads {heads} is not divisible by num_key_value_heads "
                               f"{kv_heads}")
        return Sizes(hidden=hidden, ffn=int(config["intermediate_size"]), heads=heads, kv_heads=kv_heads,
                     layers=int(config["num_hidden_layers"]), head_dim=int(config.get("head_dim") or hidden // heads),
                     vocab=int(config["vocab_size"]), positions=int(config.get("max_position_embeddings", 0)))

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", True))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        bias = bool(config.get("use_bias", True))
        a, m = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
        hid_in, hid_out = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out")
        return [
            TensorSpec("model.embed_tokens.weight", (Dim((VOCAB,), "elem"), hid_out), "embedding"),
            *layer_norm("model.layers.{}.input_layernorm", _EPS),
            *linear(a + "q_proj", Dim(_Q, "out", gated=True), hid_in, bias),
            *linear(a + "k_proj", Dim(_KV, "out", gated=True), hid_in, bias),
            *linear(a + "v_proj", Dim(_KV, "out"), hid_in, bias),
            *linear(a + "o_proj", hid_out, Dim(_Q, "in"), bias),
            *layer_norm("model.layers.{}.post_attention_layernorm", _EPS),
            *linear(m + "c_fc", Dim((FFN,), "out"), hid_in, bias),
            *linear(m + "c_proj", hid_out, Dim((FFN,), "in"), bias),
            *layer_norm("model.norm", _EPS, per_layer=False, final=True),
            *head(self.tied(config)),
        ]

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        new = dict(config)
        new.update(hidden_size=target.hidden, intermediate_size=target.ffn, num_attention_heads=target.heads,
                   num_key_value_heads=target.kv_heads, num_hidden_layers=target.layers)
        if config.get("head_dim") is not None:
            new["head_dim"] = target.head_dim
        return new

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: q_proj holds heads x head_dim as one width, and no tensor records head_dim."""
        q = "model.layers.0.self_attn.q_proj.weight"
        if _FC not in shapes or q not in shapes:
            return None
        q_out, kv_out = shapes[q][0], shapes["model.layers.0.self_attn.k_proj.weight"][0]
        raise heads_not_in_shapes(q_out, math.gcd(q_out, kv_out))
