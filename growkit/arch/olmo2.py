"""OLMo 2: the Llama layout with norms after attention and the MLP instead of before (h + norm(f(h))), and q/k
RMSNorms over the whole projection (every head at once, not per head).

With post-norms the blocks read the residual stream itself, so a stream copy's writer scale (DESIGN §2) is divided
out of every block reader's column; the post-norm's input (o_proj / down_proj rows) carries the scale, so its
statistic holds and its gain writes the stream unchanged. The q/k norms' statistic spans the heads, so uneven head
multiplicities get the same treatment on the head axes (`Dim.normed`).
"""

from __future__ import annotations

from typing import Any

from growkit.arch.llama import RMS_NORM, LlamaFamily
from growkit.arch.spec import (
    FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, Dim, Family, Limit, StreamRole, TensorSpec, heads_not_in_shapes,
)

_Q = (KV_HEADS, QGROUP, HEAD_DIM)
_KV = (KV_HEADS, HEAD_DIM)
_Q_NORM = "model.layers.0.self_attn.q_norm.weight"
_POST_FF_NORM = "model.layers.0.post_feedforward_layernorm.weight"


class Olmo2Family(LlamaFamily):
    """Sizes, tying and config rewriting as Llama's; the tensor layout and where the norms sit differ."""

    def __init__(self) -> None:
        Family.__init__(self, name="olmo2", model_types=("olmo2",), ignorable=(".rotary_emb.inv_freq",),
                        limits=(Limit("copy-pad", "inexact", "a fresh kv head's key rows must be non-zero to train, and "
                                      "they enter the k norm's statistic (exact when the kv heads are kept)"),))

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        bias = bool(config.get("attention_bias", False))
        a, m = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
        hid_in, hid_out, hid_e = Dim((HIDDEN,), "in"), Dim((HIDDEN,), "out"), Dim((HIDDEN,), "elem")

        def linear(name: str, out: Dim, inp: Dim, stream: StreamRole, has_bias: bool = False) -> list[TensorSpec]:
            specs = [TensorSpec(name + ".weight", (out, inp), per_layer=True, stream=stream)]
            if has_bias:
                specs.append(TensorSpec(name + ".bias", (out,), "bias", per_layer=True, stream=stream))
            return specs

        def norm(name: str, dim: Dim, stream: StreamRole | None) -> TensorSpec:
            return TensorSpec(name, (dim,), "norm_weight", per_layer=True, stream=stream, norm=RMS_NORM)

        layer = [
            *linear(a + "q_proj", Dim(_Q, "out", normed=True), hid_in, "raw_reader", bias),
            *linear(a + "k_proj", Dim(_KV, "out", gated=True, normed=True), hid_in, "raw_reader", bias),
            *linear(a + "v_proj", Dim(_KV, "out"), hid_in, "raw_reader", bias),
            *linear(a + "o_proj", hid_out, Dim(_Q, "in"), "normed_writer", bias),
            norm(a + "q_norm.weight", Dim(_Q, "elem", normed=True), None),
            norm(a + "k_norm.weight", Dim(_KV, "elem", normed=True), None),
            norm("model.layers.{}.post_attention_layernorm.weight", hid_e, "post_norm"),
            *linear(m + "gate_proj", Dim((FFN,), "out", gated=True), hid_in, "raw_reader"),
            *linear(m + "up_proj", Dim((FFN,), "out"), hid_in, "raw_reader"),
            *linear(m + "down_proj", hid_out, Dim((FFN,), "in"), "normed_writer"),
            norm("model.layers.{}.post_feedforward_layernorm.weight", hid_e, "post_norm"),
        ]
        return self.around(config, layer)

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: the q/k norms span heads x head_dim as one width, so no shape records the head count."""
        if "model.embed_tokens.weight" not in shapes or _POST_FF_NORM not in shapes:
            return None
        raise heads_not_in_shapes(shapes[_Q_NORM][0], shapes["model.layers.0.self_attn.k_norm.weight"][0])
