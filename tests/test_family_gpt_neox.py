"""GPT-NeoX's fused `query_key_value` is laid out per head ([heads, 3, head_dim]): growth must move each head's q, k
and v rows together and treat its q and k sections, not its first heads, as the gated ones. Its untied head is
`embed_out.weight` in files and `lm_head.weight` in the model: both are grown."""

from __future__ import annotations

import json

import torch
import transformers as T
from conftest import randomize, tiny_config
from test_trainability import _adam_steps

import growkit
from growkit import grow
from growkit.verify import compare, random_tokens


def test_copy_pad_fresh_heads_get_random_query_and_key_rows_and_train(tiny, tmp_path):
    out = grow(tiny("gpt_neox"), tmp_path / "out", width="2x", method="copy-pad", quiet=True).out_dir
    model = T.AutoModelForCausalLM.from_pretrained(out)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    qkv = model.state_dict()[name].reshape(8, 3, 8, 64).clone()  # heads 4 -> 8, head_dim 8, hidden 32 -> 64
    fresh = qkv[4:]
    # q and k rows random (a zero partner would leave both at a saddle), v rows zero (the head writes nothing yet)
    assert (fresh[:, :2] != 0).all() and (fresh[:, 2] == 0).all()
    moved = _adam_steps(model, steps=2)[name].reshape(8, 3, 8, 64)
    assert (moved[4:] > 0).all()


def test_rotary_dims_and_head_dim_stay_the_sources(tiny, tmp_path):
    """Partial rotary rotates a fixed fraction of head_dim: growing hidden with the heads keeps both."""
    out = grow(tiny("gpt_neox"), tmp_path / "out", width="3x", quiet=True).out_dir
    config = json.loads((out / "config.json").read_text())
    grown = T.AutoModelForCausalLM.from_pretrained(out)
    attention = grown.gpt_neox.layers[0].attention
    assert (config["hidden_size"], config["num_attention_heads"]) == (96, 12)
    assert (attention.head_size, attention.rotary_ndims) == (8, 2)
    assert torch.equal(grown.gpt_neox.rotary_emb.inv_freq, torch.tensor([1.0]))


def test_an_in_memory_model_whose_head_is_lm_head_grows_exactly():
    torch.manual_seed(0)
    model = randomize(T.AutoModelForCausalLM.from_config(tiny_config("gpt_neox"))).eval()
    assert "lm_head.weight" in model.state_dict() and "embed_out.weight" not in model.state_dict()
    grown = growkit.grow_model(model, width="2x").eval()
    c = compare(model, grown, random_tokens(model.config.vocab_size))
    assert c["max_abs_dlogits"] <= 1e-5 * c["max_abs_logit"], c
