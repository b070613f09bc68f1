"""Neuron features: whole head blocks, mean-field units, Gram matrices summed tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from growkit import grow
from growkit.arch.registry import family_for
from growkit.arch.spec import FFN, HIDDEN, KV_HEADS, QGROUP
from growkit.checkpoint.reader import load_checkpoint
from growkit.measure.features import axis_features, fan_in, neuron_features
from growkit.measure.fit import fit_axes
from growkit.measure.stats import tensor_stats


def _model(path):
    ckpt = load_checkpoint(path)
    family = family_for(ckpt.config)
    return ckpt, family, family.sizes(ckpt.config), family.tensors(ckpt.config, ckpt.names())


def _spec(specs, suffix):
    return next(s for s in specs if s.name.endswith(suffix))


def test_a_head_owns_its_whole_block(tiny):
    ckpt, family, sizes, specs = _model(tiny("llama-tied"))  # 4 query heads in 2 kv groups, head_dim 8
    assert (sizes.kv_heads, sizes.qgroup, sizes.head_dim) == (2, 2, 8)
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")  # rows: kv x qgroup x head_dim
    spec = _spec(specs, "q_proj.weight")
    kv = axis_features(q, spec, sizes, KV_HEADS)
    assert kv.shape == (2, 16 * 32)
    assert torch.equal(kv[1], q[16:32].reshape(-1))
    group = axis_features(q, spec, sizes, QGROUP)  # query g of every kv group: rows kv*16 + g*8 + d
    rows = [a * 16 + 1 * 8 + d for a in range(2) for d in range(8)]
    assert torch.equal(group[1], q[rows].reshape(-1))
    o = ckpt.get("model.layers.0.self_attn.o_proj.weight")  # columns: kv x qgroup x head_dim
    kv_o = axis_features(o, _spec(specs, "o_proj.weight"), sizes, KV_HEADS)
    assert torch.equal(kv_o[0], o[:, :16].reshape(-1))
    assert axis_features(o, _spec(specs, "o_proj.weight"), sizes, FFN) is None


def test_features_are_in_mean_field_units_and_span_every_tensor(tiny):
    ckpt, family, sizes, specs = _model(tiny("gpt2"))
    features, blocks = neuron_features(ckpt, specs, sizes, (HIDDEN, None))
    names = [n for n, _ in blocks]
    assert "transformer.wte.weight" in names and "transformer.h.1.ln_2.bias" in names and "transformer.ln_f.weight" in names
    assert features.shape == (32, sum(w for _, w in blocks))
    # c_fc (Conv1D [in=hidden, out=ffn]) reads hidden: its block is the hidden neuron's row, times fan-in 32
    offset = sum(w for n, w in blocks[: names.index("transformer.h.0.mlp.c_fc.weight")])
    c_fc = ckpt.get("transformer.h.0.mlp.c_fc.weight")
    assert fan_in(_spec(specs, "mlp.c_fc.weight"), sizes) == 32
    assert torch.allclose(features[:, offset:offset + c_fc.shape[1]], c_fc * 32)


def test_gram_summed_tensor_by_tensor_matches_the_explicit_features(tiny):
    ckpt, family, sizes, specs = _model(tiny("llama-gqa4"))
    fits = fit_axes(ckpt, specs, sizes, {(HIDDEN, None), (FFN, 1)}, rank=4, residuals=True, keep_gram=True)
    for key in ((HIDDEN, None), (FFN, 1)):
        x, blocks = neuron_features(ckpt, specs, sizes, key)
        weights = torch.cat([torch.full((w,), fits[key].blocks[name].weight, dtype=torch.float64) for name, w in blocks])
        xw = x.double() * weights
        assert torch.allclose(fits[key].gram, xw @ xw.T, rtol=1e-9)
        # every block has mean squared norm 1 per neuron, so each tensor weighs the same
        assert fits[key].gram.trace() == pytest.approx(len(blocks) * sizes.axis(key[0]), rel=1e-9)
        shares = sum(b.share for b in fits[key].blocks.values())
        assert shares == pytest.approx(1.0, rel=1e-6)  # the r unit principal directions live in the blocks
        explained = sum(b.explained for b in fits[key].blocks.values())
        assert explained == pytest.approx(float(fits[key].pca.s2.sum()) / (sizes.axis(key[0]) - 1), rel=1e-9)


def test_clone_keeps_norm_distributions_in_mean_field_units(tiny, tmp_path):
    src = tiny("llama-gqa4")
    out = grow(src, tmp_path / "clone", width="2x", quiet=True).out_dir
    a, fa, sa, specs_a = _model(src)
    b, fb, sb, specs_b = _model(out)
    for spec in specs_a:
        layer = 0 if spec.per_layer else None
        _, na = tensor_stats(a.get(spec.at(layer)), spec, layer, sa)
        _, nb = tensor_stats(b.get(spec.at(layer)), spec, layer, sb)
        for side in na:
            if side == "cols" and spec.name == "model.embed_tokens.weight" or side == "rows" and spec.name == "lm_head.weight":
                continue  # vocab is not grown: those are per-token norms over a grown axis (duplicated entries)
            assert np.allclose(np.sort(np.repeat(na[side], len(nb[side]) // len(na[side]))), np.sort(nb[side]),
                               rtol=1e-5, atol=1e-6), (spec.name, side)
