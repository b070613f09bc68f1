"""Phi-3: the Llama layout with fused projections. `qkv_proj` writes q (heads x head_dim), then k and v (kv_heads x
head_dim each): three sections of unequal size under GQA; `gate_up_proj` writes gate then up (ffn each)."""

from __future__ import annotations

from typing import Any

from growkit.arch.llama import RMS_NORM, LlamaFamily
from growkit.arch.spec import (
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, Dim, Family, TensorSpec, heads_not_in_shapes,
)

_Q = (KV_HEADS, QGROUP, HEAD_DIM)
_KV = (KV_HEADS, HEAD_DIM)
_QKV = "model.layers.0.self_attn.qkv_proj.weight"


class Phi3Family(LlamaFamily):
    """Sizes, tying and config rewriting as Llama's (a partial rotary factor and longrope's per-frequency factor
    lists depend on head_dim only, which growth keeps); only the tensor layout differs."""

    def __init__(self) -> None:
        Family.__init__(self, name="phi3", model_types=("phi3",), ignorable=(".rotary_emb.inv_freq",))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        a, m = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
        hid_in, hid_out, hid_e = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out"), (Dim((HIDDEN,), "elem"),)
        layer = [
            TensorSpec("model.layers.{}.input_layernorm.weight", hid_e, "norm_weight", per_layer=True, norm=RMS_NORM),
            TensorSpec(a + "qkv_proj.weight", (Dim.concat((_Q, _KV, _KV), "out", gated=(0, 1)), hid_in),
                       per_layer=True),
            TensorSpec(a + "o_proj.weight", (hid_out, Dim(_Q, "in")), per_layer=True),
            TensorSpec("model.layers.{}.post_attention_layernorm.weight", hid_e, "norm_weight", per_layer=True,
                       norm=RMS_NORM),
            TensorSpec(m + "gate_up_proj.weight", (Dim.concat(((FFN,), (FFN,)), "out", gated=(0,)), hid_in),
                       per_layer=True),
            TensorSpec(m + "down_proj.weight", (hid_out, Dim((FFN,), "in")), per_layer=True),
        ]
        return self.around(config, layer)

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: the fused `qkv_proj` holds q, k and v as one width, and nothing records the head count."""
        if "model.embed_tokens.weight" not in shapes or _QKV not in shapes:
            return None
        hidden = shapes["model.embed_tokens.weight"][1]
        raise heads_not_in_shapes(hidden, hidden)
