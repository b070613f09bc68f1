"""The Gemma family (Gemma, Gemma2, Gemma3's text model): Llama's tensor layout with GeGLU, RMSNorm gains used as
1 + w, embeddings multiplied by sqrt(hidden) at the input, and from Gemma2 on, norms on each block's outputs.

What the specs say beyond Llama's: every norm is `Norm("rms", "rms_norm_eps", offset=1.0)`; the embedding's
`size_power` (hidden, -1/2) stores it divided by sqrt(new / old hidden) so that the input normaliser, which grows
with hidden, multiplies it back to the source's value; with a tied head, the head reads that stored embedding, so
the final norm's gain gets the inverse. Gemma2's post-norms are `stream="post_norm"` (o_proj and down_proj feed them:
"normed_writer"), so identity depth sets their gain 1 + w to zero, as OLMo2's. Soft-capping (`final_logit_softcapping`, `attn_logit_softcapping`), `query_pre_attn_scalar`, `head_dim` and
the sliding window are config entries no growth changes; `layer_types` is re-indexed by depth growth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from growkit.arch.llama import LlamaFamily
from growkit.arch.spec import HIDDEN, Dim, Family, Norm, Sizes, TensorSpec

#: model_type -> (per-head q/k norms, norms on the attention and MLP outputs)
_VARIANTS = {"gemma": (False, False), "gemma2": (False, True), "gemma3_text": (True, True)}
#: GemmaConfig's head_dim when a config.json leaves it out (transformers does not derive it from hidden / heads)
_DEFAULT_HEAD_DIM = 256
_LAYER = "model.layers.{}."
#: From Gemma2 on, the block outputs that pass a post-norm before the residual add
_POST_NORMED = tuple(_LAYER + name for name in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight",
                                                "mlp.down_proj.bias"))
#: Every norm, q/k norms included, is an RMSNorm whose gain is 1 + w
_NORM = Norm("rms", eps_key="rms_norm_eps", offset=1.0)


class GemmaFamily(LlamaFamily):
    def __init__(self) -> None:
        Family.__init__(self, name="gemma", model_types=tuple(_VARIANTS), ignorable=(".rotary_emb.inv_freq",))

    def sizes(self, config: dict[str, Any]) -> Sizes:
        return super().sizes({**config, "head_dim": config.get("head_dim", _DEFAULT_HEAD_DIM)})

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", True))

    def variant(self, config: dict[str, Any]) -> tuple[bool, bool]:
        return False, _VARIANTS[config["model_type"]][0]

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        post_norms = _VARIANTS[config["model_type"]][1]
        specs = []
        for spec in super().tensors(config, names):
            if spec.kind == "embedding":
                spec = replace(spec, size_power=(HIDDEN, -0.5))
            elif spec.kind == "norm_weight":
                # Gemma2's post_attention_layernorm normalises the attention output (Gemma's, the MLP's input).
                post = post_norms and spec.name == _LAYER + "post_attention_layernorm.weight"
                tied_final = spec.final_norm and self.tied(config)
                spec = replace(spec, norm=_NORM, stream="post_norm" if post else None,
                               size_power=(HIDDEN, 0.5) if tied_final else None)
            elif post_norms and spec.name in _POST_NORMED:  # feeds a post-norm, which writes the stream
                spec = replace(spec, stream="normed_writer")
            specs.append(spec)
        if post_norms:
            specs += [TensorSpec(_LAYER + f"{where}_feedforward_layernorm.weight", (Dim((HIDDEN,), "elem"),),
                                 "norm_weight", per_layer=True, norm=_NORM,
                                 stream="post_norm" if where == "post" else None)
                      for where in ("pre", "post")]
        return specs

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: Gemma's tensor names are Llama's, and its soft-capping, window and query scale are in no tensor."""
        return None
