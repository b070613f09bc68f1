"""GPT-NeoX (Pythia): fused `query_key_value` laid out per head, parallel or sequential residual, partial rotary,
LayerNorm with bias, an untied head by default.

`query_key_value` writes [heads, 3, head_dim] (transformers views its output as heads x (q, k, v) x head_dim), so
its output dim is kv_heads x qgroup x qkv x head_dim with a qgroup of 1: a whole head, with its q, k and v rows,
moves as one. head_dim is hidden / heads in this config, so it never changes while hidden and heads grow together,
and the rotary dims (a fixed fraction of head_dim, `rotary_pct`) stay the source's. The residual form
(`use_parallel_residual`) changes no tensor: every block still reads the stream through its own norms and writes
it with `attention.dense` and `dense_4h_to_h`.
"""

from __future__ import annotations

from typing import Any

from growkit.arch.spec import (
    LAYERNORM_STREAM,
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, QKV, VOCAB, Dim, Family, Sizes, TensorSpec, head, heads_not_in_shapes,
    layer_norm, linear, multi_head_sizes,
)

_HEADS = (KV_HEADS, QGROUP, HEAD_DIM)
_QKV = (KV_HEADS, QGROUP, QKV, HEAD_DIM)
_P = "gpt_neox."
#: transformers 5 names the head `lm_head` in the model and `embed_out` in the files it saves (and Pythia's)
_HEAD, _STORED_HEAD = "lm_head.weight", "embed_out.weight"


_EPS = "layer_norm_eps"
LIMITS = LAYERNORM_STREAM


class GPTNeoXFamily(Family):
    def __init__(self) -> None:
        super().__init__(name="gpt_neox", model_types=("gpt_neox",), limits=LIMITS,
                         ignorable=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"))

    def sizes(self, config: dict[str, Any]) -> Sizes:
        return multi_head_sizes(config, ffn=int(config["intermediate_size"]))

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", False))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        bias = bool(config.get("attention_bias", True))
        h = f"{_P}layers.{{}}."
        hid_in, hid_out = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out")
        return [
            TensorSpec(f"{_P}embed_in.weight", (Dim((VOCAB,), "elem"), hid_out), "embedding"),
            *layer_norm(h + "input_layernorm", _EPS),
            *linear(h + "attention.query_key_value", Dim(_QKV, "out", gated=(0, 1)), hid_in, bias),
            *linear(h + "attention.dense", hid_out, Dim(_HEADS, "in"), bias),
            *layer_norm(h + "post_attention_layernorm", _EPS),
            *linear(h + "mlp.dense_h_to_4h", Dim((FFN,), "out"), hid_in, True),
            *linear(h + "mlp.dense_4h_to_h", hid_out, Dim((FFN,), "in"), True),
            *layer_norm(f"{_P}final_layer_norm", _EPS, per_layer=False, final=True),
            *head(self.tied(config)),
        ]

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        new = dict(config)
        new.update(hidden_size=target.hidden, intermediate_size=target.ffn, num_attention_heads=target.heads,
                   num_hidden_layers=target.layers)
        return new

    def stored_names(self, names: list[str]) -> dict[str, str]:
        """The head as saved files name it (`embed_out.weight`), read under the model's name for it."""
        if _STORED_HEAD in names and f"{_P}embed_in.weight" in names and _HEAD not in names:
            return {_HEAD: _STORED_HEAD}
        return {}

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: `query_key_value` holds heads x 3 x head_dim as one width, and nothing records the head count."""
        if f"{_P}embed_in.weight" not in shapes or f"{_P}layers.0.attention.query_key_value.weight" not in shapes:
            return None
        hidden = shapes[f"{_P}embed_in.weight"][1]
        raise heads_not_in_shapes(hidden, hidden)
