"""OPT: learned positions looked up 2 rows past the position, ReLU `fc1`/`fc2`, LayerNorm before the blocks
(`do_layer_norm_before`) or after them (OPT-350m), and `project_in`/`project_out` between a narrower word-embedding
width (`word_embed_proj_dim`) and hidden.

With the projections, the word embedding and the head live in their own fixed width (`embed_proj`): only
`project_in` (a residual writer) and `project_out` (a reader of the stream) touch hidden, so a tied head needs no
correction. Post-LayerNorm blocks end in a norm, which makes two refusals (`refusal`): no block can start as an
identity, and without the projections a tied head has no final norm gain in front of it to carry its fan-in
correction (it reads the last block's own norm, which a per-layer tensor template cannot single out; likewise
without norm gains at all, `layer_norm_elementwise_affine` false).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from growkit.arch.spec import (
    LAYERNORM_STREAM, Limit,
    EMBED_PROJ, FFN, HEAD_DIM, HIDDEN, KV_HEADS, POSITIONS, QGROUP, VOCAB, Dim, Family, Sizes, TensorSpec,
    head, heads_not_in_shapes, layer_norm, linear, multi_head_sizes,
)

if TYPE_CHECKING:
    from growkit.plan import GrowthPlan

_HEADS = (KV_HEADS, QGROUP, HEAD_DIM)
_D = "model.decoder."
_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding looks position p up at row p + 2


_EPS = "layer_norm_eps"  # OPTConfig has no eps field (torch's LayerNorm default, 1e-5): the key is never found
LIMITS = (*LAYERNORM_STREAM,
          # a block that ends in a LayerNorm normalises the stream even when it writes nothing to it
          Limit("depth:identity", "refused", "OPT with do_layer_norm_before false ends every block in a LayerNorm, so "
                "no block computes the identity; use --depth-method stack or interleave",
                when=("do_layer_norm_before", False)))


class OPTFamily(Family):
    def __init__(self) -> None:
        super().__init__(name="opt", model_types=("opt",), limits=LIMITS)

    def sizes(self, config: dict[str, Any]) -> Sizes:
        return multi_head_sizes(config, ffn=int(config["ffn_dim"]), position_offset=_POSITION_OFFSET,
                                embed_proj=_embed_proj(config) or int(config["hidden_size"]))

    def tied(self, config: dict[str, Any]) -> bool:
        return bool(config.get("tie_word_embeddings", True))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        bias = bool(config.get("enable_bias", True))
        pre_norm = bool(config.get("do_layer_norm_before", True))
        affine = bool(config.get("layer_norm_elementwise_affine", True))
        projected = _embed_proj(config) is not None
        word = Dim((EMBED_PROJ,), "out") if projected else Dim((HIDDEN,), "out")
        h, a = f"{_D}layers.{{}}.", f"{_D}layers.{{}}.self_attn."
        hid_in, hid_out = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out")
        specs = [
            TensorSpec(f"{_D}embed_tokens.weight", (Dim((VOCAB,), "elem"), word), "embedding"),
            TensorSpec(f"{_D}embed_positions.weight", (Dim((POSITIONS,), "elem"), hid_out), "embedding"),
            *(layer_norm(h + "self_attn_layer_norm", _EPS) if affine else []),
            *linear(a + "q_proj", Dim(_HEADS, "out", gated=True), hid_in, bias),
            *linear(a + "k_proj", Dim(_HEADS, "out", gated=True), hid_in, bias),
            *linear(a + "v_proj", Dim(_HEADS, "out"), hid_in, bias),
            *linear(a + "out_proj", hid_out, Dim(_HEADS, "in"), bias),
            *(layer_norm(h + "final_layer_norm", _EPS) if affine else []),
            *linear(h + "fc1", Dim((FFN,), "out"), hid_in, bias),
            *linear(h + "fc2", hid_out, Dim((FFN,), "in"), bias),
        ]
        if pre_norm and affine and not config.get("_remove_final_layer_norm", False):
            # with the projections the head reads project_out's fixed width: this norm owes it no correction
            specs += layer_norm(f"{_D}final_layer_norm", _EPS, per_layer=False, final=not projected)
        if projected:
            specs += [TensorSpec(f"{_D}project_in.weight", (hid_out, Dim((EMBED_PROJ,), "in"))),
                      TensorSpec(f"{_D}project_out.weight", (Dim((EMBED_PROJ,), "out"), hid_in))]
        return specs + head(self.tied(config), word.axes)

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        new = dict(config)
        new.update(hidden_size=target.hidden, ffn_dim=target.ffn, num_attention_heads=target.heads,
                   num_hidden_layers=target.layers)
        if _embed_proj(config) is None:  # the word embedding is the stream: it grows with it
            new["word_embed_proj_dim"] = target.hidden
        return new

    def refusal(self, config: dict[str, Any], plan: "GrowthPlan") -> str | None:
        proj = _embed_proj(config)
        if proj is not None and plan.target.hidden == proj:
            return (f"hidden {plan.target.hidden} would equal word_embed_proj_dim {proj}, and transformers builds "
                    "OPT's project_in/project_out only where the two differ; choose another hidden size")
        if (plan.source.hidden != plan.target.hidden and self.tied(config) and proj is None
                and not any(s.final_norm for s in self.tensors(config, []))):
            return ("OPT's tied head reads the stream through no final LayerNorm gain (do_layer_norm_before false, "
                    "layer_norm_elementwise_affine false or _remove_final_layer_norm), the one place its fan-in "
                    "correction can go, so hidden cannot change")
        return None

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: q_proj holds heads x head_dim as one width, and nothing records the head count."""
        if f"{_D}embed_positions.weight" not in shapes or f"{_D}layers.0.self_attn.q_proj.weight" not in shapes:
            return None
        hidden = shapes[f"{_D}embed_positions.weight"][1]
        raise heads_not_in_shapes(hidden, hidden)


def _embed_proj(config: dict[str, Any]) -> int | None:
    """The word-embedding width when `project_in`/`project_out` exist (it differs from hidden), else None."""
    proj = config.get("word_embed_proj_dim")
    return None if proj is None or int(proj) == int(config["hidden_size"]) else int(proj)
