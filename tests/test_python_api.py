"""`growkit.grow_model`: growth in memory, for training pipelines, on real transformers models."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from growkit import GrowkitError, grow_model
from growkit.verify import compare, random_tokens

from conftest import randomize, tiny_config


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa4", "qwen2"])
def test_grow_model_in_memory_is_exact_and_independent(family):
    torch.manual_seed(0)
    small = randomize(T.AutoModelForCausalLM.from_config(tiny_config(family))).eval()
    before = {n: p.clone() for n, p in small.state_dict().items()}
    big = grow_model(small, width="2x", layers="2x", depth_method="identity").eval()
    assert type(big) is type(small)
    assert big.config.num_hidden_layers == 4 and big.config.hidden_size == 64
    gap = compare(small, big, random_tokens(small.config.vocab_size))
    assert gap["max_abs_dlogits"] < 1e-5
    assert all(torch.equal(before[n], p) for n, p in small.state_dict().items())  # the source is untouched
    if small.config.tie_word_embeddings:
        assert big.lm_head.weight.data_ptr() == big.get_input_embeddings().weight.data_ptr()


def test_grow_model_rejects_impossible_requests():
    small = T.AutoModelForCausalLM.from_config(tiny_config("llama-gqa4"))
    with pytest.raises(GrowkitError, match="integer ratios"):
        grow_model(small, hidden=48)
    with pytest.raises(GrowkitError, match="multiple of kv heads"):
        grow_model(small, heads=6, kv_heads=4, method="net2net")
