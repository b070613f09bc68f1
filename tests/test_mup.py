"""µP learning-rate groups: multipliers follow fan-in growth, with GPT-2's Conv1D fan-in on dim 0."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import growkit
from growkit.errors import GrowkitError
from growkit.train.mup import mup_param_groups, mup_param_info, scaled_base_config

LR = 1e-3


def gpt2(n_embd=32, n_head=4, n_inner=None, n_layer=2, tie=True):
    return T.GPT2Config(n_embd=n_embd, n_head=n_head, n_inner=n_inner, n_layer=n_layer, vocab_size=101,
                        n_positions=64, tie_word_embeddings=tie)


def llama(hidden=32, ffn=48, heads=4, kv=2, layers=2, tie=False):
    return T.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
                         num_hidden_layers=layers, vocab_size=101, max_position_embeddings=64, head_dim=hidden // heads
                         if heads else None, tie_word_embeddings=tie)


def lr_of(groups: list[dict]) -> dict[str, float]:
    return {name: g["lr"] for g in groups for name in g["param_names"]}


def build(cfg):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg)


def test_gpt2_ffn_only_growth_uses_conv1d_dim0_as_fan_in():
    # Only the MLP width grows (128 -> 256): c_fc [in=32, out=256] keeps its fan-in; c_proj [in=256, out=32] doubles it.
    # Reading Conv1D's fan-in from the last dim (the nn.Linear convention) would swap these two.
    model = build(gpt2(n_inner=256))
    lrs = lr_of(mup_param_groups(model, gpt2(n_inner=128).to_dict(), LR, 0.1))
    assert lrs["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(LR)
    assert lrs["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(LR / 2)
    assert lrs["transformer.h.1.attn.c_attn.weight"] == pytest.approx(LR)
    assert lrs["transformer.h.1.mlp.c_fc.bias"] == pytest.approx(LR)


def test_gpt2_width_2x_and_3x():
    for mult in (2, 3):
        model = build(gpt2(n_embd=32 * mult, n_head=4 * mult))
        groups = mup_param_groups(model, gpt2(), LR, 0.1)
        lrs = lr_of(groups)
        for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            assert lrs[f"transformer.h.0.{name}"] == pytest.approx(LR / mult), name
        for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                     "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias"):
            assert lrs[name] == pytest.approx(LR), name
        # Tied head: lm_head is the embedding, listed once, at full LR. Every parameter is in exactly one group.
        assert "lm_head.weight" not in lrs
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
        assert decay["transformer.h.0.mlp.c_fc.weight"] == 0.1 and decay["transformer.h.0.ln_1.weight"] == 0.0


def test_llama_width_growth_with_gqa_and_untied_head():
    model = build(llama(hidden=64, ffn=96, heads=8, kv=4))
    lrs = lr_of(mup_param_groups(model, llama().to_dict(), LR, 0.0))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        assert lrs[f"model.layers.1.{name}.weight"] == pytest.approx(LR / 2), name
    assert lrs["lm_head.weight"] == pytest.approx(LR / 2)  # output matrix: fan-in is hidden, which doubled
    assert lrs["model.embed_tokens.weight"] == pytest.approx(LR)
    assert lrs["model.norm.weight"] == pytest.approx(LR)
    assert lrs["model.layers.0.input_layernorm.weight"] == pytest.approx(LR)


def test_llama_ffn_only_growth_scales_down_proj_only():
    model = build(llama(ffn=96))
    lrs = lr_of(mup_param_groups(model, llama(), LR, 0.0))
    assert lrs["model.layers.0.mlp.up_proj.weight"] == pytest.approx(LR)
    assert lrs["model.layers.0.mlp.gate_proj.weight"] == pytest.approx(LR)
    assert lrs["model.layers.0.mlp.down_proj.weight"] == pytest.approx(LR / 2)
    assert lrs["model.layers.0.self_attn.o_proj.weight"] == pytest.approx(LR)


def test_depth_growth_maps_new_layers_to_base_layer_shapes():
    model = build(llama(hidden=64, ffn=96, heads=8, kv=4, layers=4))
    infos = {i.name: i for i in mup_param_info(model, llama().to_dict())}
    for layer in range(4):
        info = infos[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert (info.fan_in, info.base_fan_in, info.lr_mult) == (96, 48, 0.5)
    # Pure depth growth: every multiplier is 1.
    deep = build(gpt2(n_layer=6))
    assert {round(i.lr_mult, 9) for i in mup_param_info(deep, gpt2())} == {1.0}


def test_grown_by_growkit_matches_rule():
    """A model grown 2x by the real pipeline: groups computed against its source config."""
    small = build(gpt2())
    grown = growkit.grow_model(small, width=2, method="clone")
    lrs = lr_of(growkit.mup_param_groups(grown, small.config.to_dict(), LR, 0.1))
    assert lrs["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(LR / 2)
    assert lrs["transformer.wte.weight"] == pytest.approx(LR)
    opt = torch.optim.AdamW(growkit.mup_param_groups(grown, small.config, LR, 0.1))
    assert {round(g["lr"], 12) for g in opt.param_groups} == {LR, LR / 2}


def test_no_base_means_plain_groups_and_base_width_derivation():
    model = build(llama(hidden=64, ffn=96, heads=8, kv=4))
    assert {g["lr"] for g in mup_param_groups(model, None, LR)} == {LR}
    base = scaled_base_config(model.config, 32)
    assert (base["hidden_size"], base["intermediate_size"], base["num_attention_heads"],
            base["num_key_value_heads"]) == (32, 48, 4, 2)
    assert lr_of(mup_param_groups(model, base, LR))["model.layers.0.mlp.down_proj.weight"] == pytest.approx(LR / 2)
    with pytest.raises(GrowkitError, match="whole number of heads"):
        scaled_base_config(model.config, 36)
