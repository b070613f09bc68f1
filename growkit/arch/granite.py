"""IBM Granite: Llama's tensor layout with four scalar multipliers from the config.

`embedding_multiplier` (on the input embeddings), `residual_multiplier` (on each block's output before the residual
add), `attention_multiplier` (the attention scale, instead of 1 / sqrt(head_dim)) and `logits_scaling` (logits are
divided by it) are numbers the model reads as they are, not values transformers derives from a size; growth keeps
each one, and since every operator keeps the stream, each block's output and the pre-scaling logits, the grown model
computes what the source did (head_dim, the one size an attention scale could depend on, never changes).
"""

from __future__ import annotations

from typing import Any

from growkit.arch.llama import LlamaFamily
from growkit.arch.spec import Family


class GraniteFamily(LlamaFamily):
    def __init__(self) -> None:
        Family.__init__(self, name="granite", model_types=("granite",), ignorable=(".rotary_emb.inv_freq",))

    def variant(self, config: dict[str, Any]) -> tuple[bool, bool]:
        return False, False

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Never: Granite's tensor names are Llama's, and its multipliers are in no tensor."""
        return None
