"""GPT-2: Conv1D weights stored `[in, out]`, fused `c_attn` (q, k, v sections), learned positions, LayerNorm, tied head."""

from __future__ import annotations

from typing import Any

from growkit.arch.spec import (
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, POSITIONS, QGROUP, QKV, VOCAB, LAYERNORM_STREAM, Dim, Family, Limit, Norm, Sizes,
    TensorSpec, head, heads_not_in_shapes,
)
from growkit.errors import GrowkitError

_HEADS = (KV_HEADS, QGROUP, HEAD_DIM)
_PREFIX = "transformer."  # GPT2LMHeadModel's base_model_prefix
_LN = Norm("layer", eps_key="layer_norm_epsilon")
_INDEXED_SCALE = Limit("depth", "refused", "scale_attn_by_inverse_layer_idx ties each layer's attention scale to its "
                                           "index; depth growth would change the function",
                       when=("scale_attn_by_inverse_layer_idx", True))


class GPT2Family(Family):
    def __init__(self) -> None:
        super().__init__(name="gpt2", model_types=("gpt2",), ignorable=(".attn.bias", ".attn.masked_bias"),
                         limits=(*LAYERNORM_STREAM, _INDEXED_SCALE))

    def sizes(self, config: dict[str, Any]) -> Sizes:
        hidden, heads = int(config["n_embd"]), int(config["n_head"])
        if hidden % heads:
            raise GrowkitError(f"config: n_embd {hidden} is not divisible by n_head {heads}")
        return Sizes(hidden=hidden, ffn=int(config.get("n_inner") or 4 * hidden), heads=heads, kv_heads=heads,
                     layers=int(config["n_layer"]), head_dim=hidden // heads, vocab=int(config["vocab_size"]),
                     positions=int(config.get("n_positions", 1024)))

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", True))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        p = _PREFIX
        h = f"{p}h.{{}}."
        hid_e = (Dim((HIDDEN,), "elem"),)
        layer = [
            TensorSpec(h + "ln_1.weight", hid_e, "norm_weight", per_layer=True, norm=_LN),
            TensorSpec(h + "ln_1.bias", hid_e, "norm_bias", per_layer=True, norm=_LN),
            TensorSpec(h + "attn.c_attn.weight", (Dim((HIDDEN,), "in"), Dim((QKV, *_HEADS), "out", gated=(0, 1))),
                       per_layer=True),
            TensorSpec(h + "attn.c_attn.bias", (Dim((QKV, *_HEADS), "out"),), "bias", per_layer=True),
            TensorSpec(h + "attn.c_proj.weight", (Dim(_HEADS, "in"), Dim((HIDDEN,), "out")), per_layer=True),
            TensorSpec(h + "attn.c_proj.bias", (Dim((HIDDEN,), "out"),), "bias", per_layer=True),
            TensorSpec(h + "ln_2.weight", hid_e, "norm_weight", per_layer=True, norm=_LN),
            TensorSpec(h + "ln_2.bias", hid_e, "norm_bias", per_layer=True, norm=_LN),
            TensorSpec(h + "mlp.c_fc.weight", (Dim((HIDDEN,), "in"), Dim((FFN,), "out")), per_layer=True),
            TensorSpec(h + "mlp.c_fc.bias", (Dim((FFN,), "out"),), "bias", per_layer=True),
            TensorSpec(h + "mlp.c_proj.weight", (Dim((FFN,), "in"), Dim((HIDDEN,), "out")), per_layer=True),
            TensorSpec(h + "mlp.c_proj.bias", (Dim((HIDDEN,), "out"),), "bias", per_layer=True),
        ]
        specs = [
            TensorSpec(f"{p}wte.weight", (Dim((VOCAB,), "elem"), Dim((HIDDEN,), "out")), "embedding"),
            TensorSpec(f"{p}wpe.weight", (Dim((POSITIONS,), "elem"), Dim((HIDDEN,), "out")), "embedding"),
            *layer,
            TensorSpec(f"{p}ln_f.weight", hid_e, "norm_weight", final_norm=True, norm=_LN),
            TensorSpec(f"{p}ln_f.bias", hid_e, "norm_bias", final_norm=True, norm=_LN),
        ]
        return specs + head(self.tied(config))

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        new = dict(config)
        new.update(n_embd=target.hidden, n_head=target.heads, n_layer=target.layers,
                   n_inner=None if target.ffn == 4 * target.hidden else target.ffn)
        return new

    def stored_names(self, names: list[str]) -> dict[str, str]:
        """The original GPT-2 checkpoints store the base model's tensors without `transformer.` (`wte.weight`,
        `h.0.attn.c_attn.weight`); transformers adds the prefix when loading, and so does growkit."""
        if "wte.weight" not in names or f"{_PREFIX}wte.weight" in names:
            return {}
        return {f"{_PREFIX}{n}": n for n in names if n != "lm_head.weight" and not n.startswith(_PREFIX)}

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: the fused `c_attn` holds heads x head_dim as one width, and nothing else records the head count."""
        if f"{_PREFIX}wte.weight" not in shapes or f"{_PREFIX}h.0.attn.c_attn.weight" not in shapes:
            return None
        hidden = shapes[f"{_PREFIX}wte.weight"][1]
        raise heads_not_in_shapes(hidden, hidden)
