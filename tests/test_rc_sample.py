"""The rc-sample operator: loads in transformers, deterministic per seed, coherent across tensors, mean-field
scaled, kept neurons untouched, shrinking by sampling, expected pre-activations preserved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from growkit import grow
from growkit.arch.spec import FFN, HIDDEN
from growkit.checkpoint.reader import load_checkpoint
from growkit.cli import app
from growkit.measure.features import axis_features, tensor_items
from growkit.operators import get_operator
from growkit.pipeline import grown_tensors, plan_growth

ESTIMATORS = ["empirical", "kde", "gaussian"]


@pytest.mark.parametrize("family,estimator", [("gpt2", e) for e in ESTIMATORS] + [("llama-gqa4", e) for e in
                                                                                  ESTIMATORS] + [("qwen2", "kde")])
def test_grown_2x_loads_without_missing_or_unexpected_keys(tiny, tmp_path, family, estimator):
    result = grow(tiny(family), tmp_path / "out", width="2x", method="rc-sample", verify=True, quiet=True,
                  operator_options={"estimator": estimator})
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert result.plan.target.hidden == 64
    assert result.provenance["operator"] == "rc-sample" and result.provenance["options"]["estimator"] == estimator
    assert torch.isfinite(torch.tensor(v["grown_loss"]))


def test_deterministic_per_seed(tiny, tmp_path):
    src = tiny("llama-gqa4")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = grow(src, tmp_path / name, width="2x", method="rc-sample", seed=seed, quiet=True,
                   operator_options={"estimator": "gaussian", "resample_all": True}).out_dir
        runs[name] = load_file(out / "model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def _grow(path, estimator, resample_all=False, direction="grow", seed=0, **sizes):
    ckpt = load_checkpoint(path)
    growth = plan_growth(ckpt, method="rc-sample", seed=seed, direction=direction,
                         operator_options={"estimator": estimator, "resample_all": resample_all}, **sizes)
    out = {entry.name: t for entry, t in grown_tensors(growth, torch.float32)}
    return ckpt, growth, out


def _hidden_slices(ckpt, growth, out):
    """(tensor name, source hidden features, grown hidden features, reader scale) for every tensor touching
    hidden."""
    src, dst = growth.plan.source, growth.plan.target
    for spec, layer in tensor_items(growth.specs, src):
        if not any(HIDDEN in d.axes for d in spec.dims):
            continue
        name = spec.at(layer)
        fx = axis_features(ckpt.get(name), spec, src, HIDDEN).double()
        fy = axis_features(out[name], spec, dst, HIDDEN).double()
        reads = any(d.role == "in" and HIDDEN in d.axes for d in spec.dims) or (spec.final_norm and growth.opts.tied)
        yield name, fx, fy, (src.hidden / dst.hidden if reads else 1.0)


@pytest.mark.parametrize("family", ["llama-mha", "gpt2-untied"])
def test_a_sampled_neuron_is_the_same_draw_in_every_tensor(tiny, family):
    """kde, hidden axis only: every tensor's new hidden slices are the draw's weights applied to the source
    slices (times n/N where the tensor reads hidden); kept neurons are the source, rescaled."""
    sizes = {"hidden": 64} if family.startswith("llama") else {"hidden": 64, "heads": 8}
    ckpt, growth, out = _grow(tiny(family), "kde", **sizes)
    draw = growth.operator.draws[(HIDDEN, None)]
    assert draw.positions.tolist() == list(range(32, 64))
    checked = 0
    for name, fx, fy, scale in _hidden_slices(ckpt, growth, out):
        if fy.shape[1] != fx.shape[1]:
            continue  # the tensor also spans another grown axis (gpt2 heads); covered by the crossing test
        assert torch.allclose(fy[:32], fx * scale, atol=1e-6), name
        assert torch.allclose(fy[32:], draw.weights @ fx * scale, atol=1e-5), name
        checked += 1
    assert checked >= 8
    assert growth.config.get("rms_norm_eps", 1e-6) == ckpt.config.get("rms_norm_eps", 1e-6)  # not zero-padding


def test_gaussian_adds_independent_residual_noise_of_the_fitted_size(tiny):
    ckpt, growth, out = _grow(tiny("llama-mha"), "gaussian", hidden=128)
    draw = growth.operator.draws[(HIDDEN, None)]
    ratios = []
    for name, fx, fy, scale in _hidden_slices(ckpt, growth, out):
        residual = fy[32:] - draw.weights @ fx * scale
        expected = draw.noise[name] * scale
        if residual.numel() >= 2000:
            ratios.append(float(residual.std()) / expected)
    assert len(ratios) >= 5 and all(0.9 < r < 1.1 for r in ratios), ratios


def test_crossing_of_two_new_axes_mixes_both_draws(tiny):
    """In a matrix where hidden and ffn both grow, the new x new block is the ffn draw applied to the hidden draw."""
    ckpt, growth, out = _grow(tiny("llama-mha"), "kde", width="2x")
    h = growth.operator.draws[(HIDDEN, None)].weights
    f = growth.operator.draws[(FFN, 0)].weights
    up = ckpt.get("model.layers.0.mlp.up_proj.weight").double()  # [ffn out, hidden in]
    grown = out["model.layers.0.mlp.up_proj.weight"].double()
    assert torch.allclose(grown[48:, 32:], f @ up @ h.T * 0.5, atol=1e-5)
    assert torch.allclose(grown[:48, :32], up * 0.5, atol=1e-6)


def test_resample_all_draws_every_neuron(tiny):
    ckpt, growth, out = _grow(tiny("llama-mha"), "empirical", resample_all=True, hidden=64)
    draw = growth.operator.draws[(HIDDEN, None)]
    assert draw.positions.tolist() == list(range(64))
    emb_src, emb = ckpt.get("model.embed_tokens.weight"), out["model.embed_tokens.weight"]
    atoms = draw.weights.argmax(1)
    assert torch.equal(emb, emb_src[:, atoms])  # every column is an atom, kept ones included
    assert not torch.equal(emb[:, :32], emb_src)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shrink_samples_the_target_from_all_source_neurons(tiny, estimator):
    ckpt, growth, out = _grow(tiny("llama-mha"), estimator, direction="shrink", hidden=16)
    draw = growth.operator.draws[(HIDDEN, None)]
    atoms = growth.maps.hidden.src
    assert len(set(atoms.tolist())) == 16  # atoms drawn without replacement
    for name, fx, fy, scale in _hidden_slices(ckpt, growth, out):
        expected = (fx[atoms] if draw.weights is None else draw.weights @ fx) * scale
        if estimator == "gaussian":  # plus the residual noise, of the fitted size
            noise = draw.noise[name] * scale
            assert float((fy - expected).std()) == pytest.approx(noise, rel=0.35), name
        else:
            assert torch.allclose(fy, expected, atol=1e-5), name


def test_shrunk_and_grown_models_load(tiny, tmp_path):
    shrunk = grow(tiny("gpt2"), tmp_path / "small", width="0.5x", method="rc-sample", direction="shrink",
                  verify=True, quiet=True, operator_options={"estimator": "kde"})
    v = shrunk.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == [] and shrunk.plan.target.hidden == 16
    deeper = grow(tiny("llama-gqa4"), tmp_path / "deep", width="2x", layers=3, method="rc-sample", verify=True,
                  quiet=True, operator_options={"estimator": "gaussian"})
    assert deeper.provenance["verification"]["missing_keys"] == []


def test_identity_depth_blocks_stay_exact_zero_writers(tiny):
    ckpt, growth, out = _grow(tiny("llama-gqa4"), "gaussian", width="2x", layers="2x", depth_method="identity")
    assert growth.maps.identity_layers == {1, 3}
    assert float(out["model.layers.1.mlp.down_proj.weight"].abs().max()) == 0.0
    assert float(out["model.layers.1.self_attn.o_proj.weight"].abs().max()) == 0.0


def test_expected_ffn_map_is_preserved(tiny):
    """Empirical draws, ffn 48 -> 192: averaged over seeds, sum_p down[:, p] up[p, :] is the source's."""
    path = tiny("llama-mha")
    ckpt = load_checkpoint(path)
    down, up = ckpt.get("model.layers.0.mlp.down_proj.weight"), ckpt.get("model.layers.0.mlp.up_proj.weight")
    source = down @ up
    mean = torch.zeros_like(source)
    seeds = 40
    for seed in range(seeds):
        _, _, out = _grow(path, "empirical", seed=seed, ffn=192)
        mean += out["model.layers.0.mlp.down_proj.weight"] @ out["model.layers.0.mlp.up_proj.weight"] / seeds
    one_seed = out["model.layers.0.mlp.down_proj.weight"] @ out["model.layers.0.mlp.up_proj.weight"]
    err_mean = float(torch.linalg.norm(mean - source) / torch.linalg.norm(source))
    err_one = float(torch.linalg.norm(one_seed - source) / torch.linalg.norm(source))
    assert err_mean < 0.1 and err_mean < err_one / 3, (err_mean, err_one)


def test_cli_grow_with_rc_sample(tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["grow", str(tiny("gpt2")), "--out", str(out), "--width", "2x", "--method",
                                 "rc-sample", "--estimator", "gaussian", "--resample-all", "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["operator"] == "rc-sample"
    assert prov["options"]["estimator"] == "gaussian" and prov["options"]["resample_all"] is True


def test_unknown_estimator_fails_before_reading(tiny):
    from growkit.errors import GrowkitError

    with pytest.raises(GrowkitError, match="unknown estimator 'parzen'"):
        get_operator("rc-sample", estimator="parzen")


def test_axes_that_keep_their_size_are_untouched(tiny, tmp_path):
    """Depth-only growth has nothing to sample: with identity blocks the output is exactly the source function."""
    op = get_operator("rc-sample")
    assert op.estimator_name == "empirical" and not op.resample_all
    result = grow(tiny("llama-gqa4"), tmp_path / "deep", layers="2x", depth_method="identity", method="rc-sample",
                  verify=True, quiet=True, operator_options={"resample_all": True})
    assert result.provenance["verification"]["max_abs_dlogits"] < 1e-5
