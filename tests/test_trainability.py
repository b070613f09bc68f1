"""Grown models must train: no fresh neuron may start at a saddle where its gradient is zero forever.

Under exact function preservation a fresh neuron contributes nothing at first, so in the first step only one side of
it can move (a fresh residual-stream entry is zero, so the columns that read it get zero gradient until the
embedding column that writes it has moved). What must hold: every fresh neuron moves on some tensor in step one, and
after two steps every parameter entry has moved.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from growkit import grow


def _adam_steps(model: torch.nn.Module, steps: int) -> dict[str, torch.Tensor]:
    """Take `steps` Adam steps on a batch holding every token id before the last position (the last one feeds no
    loss); return how much each parameter moved."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    vocab = model.config.vocab_size
    tokens = torch.arange(4 * 32) % vocab
    tokens = tokens[torch.randperm(tokens.numel(), generator=torch.Generator().manual_seed(0))].reshape(4, 32)
    tokens = torch.cat([tokens, tokens[:, :1]], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    return {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}


# OLMo2 takes one more step: a fresh query head's q rows start at zero (its q norm spans every head, and a non-zero
# row would change the norm's statistic) and every block's output passes a post-norm, so the gains behind a zero
# input (fresh heads' q/k norm entries, the last post-norm's fresh entries) first get a gradient in step three.
@pytest.mark.parametrize("family,steps", [("llama-gqa4", 2), ("gpt2", 2), ("phi3", 2), ("olmo2", 3),
                                          ("olmo2-tied", 3)])
def test_copy_pad_every_parameter_moves_in_the_first_steps(tiny, tmp_path, family, steps):
    out = grow(tiny(family), tmp_path / "out", width="2x", method="copy-pad", quiet=True).out_dir
    grown = T.AutoModelForCausalLM.from_pretrained(out)
    moved = _adam_steps(grown, steps=steps)
    # Control: a randomly initialised model of the grown size; what cannot move there (position rows past the batch's
    # length) is not growth's fault. GPT-2's key bias has an exactly zero gradient in exact arithmetic (softmax cancels
    # a shift shared by all keys), so whether rounding moves it is noise: it is left out.
    torch.manual_seed(0)
    control = _adam_steps(T.AutoModelForCausalLM.from_config(grown.config), steps=steps)
    for name in [n for n in moved if n.endswith("attn.c_attn.bias")]:
        d = grown.config.n_embd
        moved[name][d:2 * d] = control[name][d:2 * d] = 0
    still = {n: int(((d == 0) & (control[n] > 0)).sum()) for n, d in moved.items()}
    assert not any(still.values()), f"entries that never moved: {still}"


def test_copy_pad_every_fresh_neuron_moves_in_the_first_step(tiny, tmp_path):
    # hidden 32->64, ffn 48->96, kv heads 2->4 (fresh kv heads) and query groups 2->4 (fresh query heads in old groups)
    out = grow(tiny("llama-tied"), tmp_path / "out", hidden=64, ffn=96, heads=16, kv_heads=4, method="copy-pad",
               quiet=True).out_dir
    moved = _adam_steps(T.AutoModelForCausalLM.from_pretrained(out), steps=1)
    layer = "model.layers.0."
    assert (moved["model.embed_tokens.weight"][:, 32:] > 0).all()  # fresh stream entries: their writer column
    # (Columns that read fresh stream entries read zeros in step one, so only old columns are asked to move.)
    assert (moved[layer + "mlp.up_proj.weight"][48:, :32] > 0).all()  # fresh FFN neurons: the gate's zero partner
    v = moved[layer + "self_attn.v_proj.weight"].reshape(4, 8, 64)
    assert (v[2:, :, :32] > 0).all()  # fresh kv heads: their value rows
    o = moved[layer + "self_attn.o_proj.weight"].reshape(64, 4, 4, 8)
    assert (o[:32, :2, 2:] > 0).all()  # fresh query heads of old kv groups: their output columns


def test_noiseless_clone_copies_stay_identical_and_noise_breaks_the_tie(tiny, tmp_path):
    src = tiny("llama-gqa4")
    for noise, expect_equal in ((None, True), (10.0, False)):
        out = grow(src, tmp_path / f"n{noise}", width="2x", noise_snr_db=noise, quiet=True).out_dir
        model = T.AutoModelForCausalLM.from_pretrained(out)
        _adam_steps(model, steps=3)
        up = model.model.layers[0].mlp.up_proj.weight.detach()
        # FFN neuron i and its copy i + 48 read the stream through copied columns (hidden j and j + 32).
        same = torch.allclose(up[:48], up[48:], atol=1e-6)
        assert same == expect_equal
