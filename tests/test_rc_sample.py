"""The rc-sample operator: loads in transformers, deterministic per seed, every source neuron kept, extra atoms drawn
i.i.d. or stratified, the estimators' spread as reader noise that is one draw in every tensor and cancels over each
atom's copies, shrinking by sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from growkit import grow
from growkit.arch.spec import HIDDEN
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
                   operator_options={"estimator": "gaussian"}).out_dir
        runs[name] = load_file(out / "model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def _grow(path, estimator, sampling=None, direction="grow", seed=0, **sizes):
    ckpt = load_checkpoint(path)
    options = {"estimator": estimator} if sampling is None else {"estimator": estimator, "sampling": sampling}
    growth = plan_growth(ckpt, method="rc-sample", seed=seed, direction=direction, operator_options=options,
                         **sizes)
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


def _zero_sum_rows(d, src):
    """Rows of `d` minus their mean over each atom's copies, times sqrt(m / (m - 1)); lone copies zero."""
    m = torch.bincount(src)[src].double()
    mean = torch.zeros(int(src.max()) + 1, d.shape[1], dtype=d.dtype).index_add_(0, src, d) / torch.bincount(
        src).double()[:, None]
    factor = torch.where(m >= 2, (m / (m - 1).clamp(min=1)).sqrt(), 0.0)
    return (d - mean[src]) * factor[:, None]


@pytest.mark.parametrize("sampling", ["iid", "stratified"])
def test_every_source_neuron_is_kept_and_extra_atoms_are_drawn(tiny, sampling):
    ckpt, growth, out = _grow(tiny("llama-mha"), "empirical", sampling=sampling, hidden=80, ffn=96)
    for m in (growth.maps.hidden, growth.maps.per_layer[("ffn", 0)]):
        n = m.old
        assert torch.equal(m.src[:n], torch.arange(n))
        counts = torch.bincount(m.src, minlength=n)
        if sampling == "stratified":  # systematic: each atom floor or ceil of the average count
            assert set(counts.tolist()) <= {m.new // n, m.new // n + 1}
    # the empirical draw is plain copies: every grown embedding column is its atom's, times its writer scale
    emb = out["model.embed_tokens.weight"].double() / growth.maps.hidden.writer.double()
    assert torch.allclose(emb, ckpt.get("model.embed_tokens.weight").double()[:, growth.maps.hidden.src], rtol=1e-6)


def test_stratified_at_an_integer_ratio_is_a_clone_up_to_order(tiny):
    ckpt, growth, out = _grow(tiny("llama-mha"), "empirical", sampling="stratified", hidden=96)
    assert torch.equal(torch.bincount(growth.maps.hidden.src), torch.full((32,), 3))
    assert growth.maps.hidden.writer is None  # uniform multiplicity k: a_i = 1


def test_kde_noise_is_one_draw_in_every_reader_tensor_and_cancels(tiny):
    """kde, hidden axis only: each reader tensor's grown hidden columns are (atom + d_j) / m_j, where d is the same
    zero-summed combination of source neurons in every tensor; writers are the plain atoms."""
    ckpt, growth, out = _grow(tiny("llama-mha"), "kde", hidden=72)
    m = growth.maps.hidden
    noise = m.reader_noise
    assert noise is not None and noise.scores is not None
    d = _zero_sum_rows(noise.scores @ noise.basis.T, m.src)  # (new, old) combinations of source neurons
    mult = torch.bincount(m.src)[m.src].double()
    readers = 0
    for name, fx, fy, _ in _hidden_slices(ckpt, growth, out):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
                          "lm_head.weight")):
            expected = (fx[m.src] + d @ fx) / mult[:, None]
            assert torch.allclose(fy, expected, atol=1e-5), name
            summed = torch.zeros_like(fx).index_add_(0, m.src, fy)  # the copies together read what the source read
            assert torch.allclose(summed, fx, atol=1e-5), name
            readers += 1
    assert readers == 11
    assert float(d.abs().max()) > 0.05
    emb = ckpt.get("model.embed_tokens.weight")[:, m.src] * m.writer  # a writer: the plain atoms, scaled
    assert torch.allclose(out["model.embed_tokens.weight"], emb, rtol=1e-6, atol=0)


def test_gaussian_adds_residual_noise_of_the_fitted_size_to_readers(tiny):
    ckpt, growth, out = _grow(tiny("llama-mha"), "gaussian", hidden=128)
    m = growth.maps.hidden
    mult = torch.bincount(m.src)[m.src].double()
    ratios = []
    for name, fx, fy, _ in _hidden_slices(ckpt, growth, out):
        expected = m.reader_noise.std.get(name, 0.0)
        residual = fy * mult[:, None] - fx[m.src]
        if name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")) and residual.numel() >= 2000:
            ratios.append(float(residual.std()) / expected)
    assert len(ratios) >= 5 and all(0.9 < r < 1.1 for r in ratios), ratios


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shrink_samples_the_target_from_all_source_neurons(tiny, estimator):
    ckpt, growth, out = _grow(tiny("llama-mha"), estimator, direction="shrink", hidden=16)
    mixing = growth.maps.hidden.mixing
    atoms = growth.maps.hidden.src
    assert len(set(atoms.tolist())) == 16  # atoms drawn without replacement
    for name, fx, fy, scale in _hidden_slices(ckpt, growth, out):
        expected = (fx[atoms] if mixing is None else mixing.weights @ fx) * scale
        if estimator == "gaussian":  # plus the residual noise, of the fitted size
            assert mixing is not None
            noise = mixing.std[name] * scale
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


def test_ffn_map_is_preserved_exactly_for_every_seed(tiny):
    """Empirical draws, ffn 48 -> 120: sum_p down[:, p] up[p, :] is the source's, not only in expectation."""
    path = tiny("llama-mha")
    ckpt = load_checkpoint(path)
    source = ckpt.get("model.layers.0.mlp.down_proj.weight") @ ckpt.get("model.layers.0.mlp.up_proj.weight")
    for seed in range(3):
        _, _, out = _grow(path, "empirical", seed=seed, ffn=120)
        grown = out["model.layers.0.mlp.down_proj.weight"] @ out["model.layers.0.mlp.up_proj.weight"]
        assert torch.allclose(grown, source, atol=1e-6)


def test_cli_grow_with_rc_sample(tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["grow", str(tiny("gpt2")), "--out", str(out), "--width", "2x", "--method",
                                 "rc-sample", "--estimator", "gaussian", "--sampling", "stratified", "--seed", "3",
                                 "-q"])
    assert result.exit_code == 0, result.output
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["operator"] == "rc-sample"
    assert prov["options"]["estimator"] == "gaussian" and prov["options"]["sampling"] == "stratified"


def test_unknown_estimator_or_sampling_fails_before_reading(tiny):
    from growkit.errors import GrowkitError

    with pytest.raises(GrowkitError, match="unknown estimator 'parzen'"):
        get_operator("rc-sample", estimator="parzen")
    with pytest.raises(GrowkitError, match="unknown sampling 'sobol'"):
        get_operator("rc-sample", sampling="sobol")


def test_axes_that_keep_their_size_are_untouched(tiny, tmp_path):
    """Depth-only growth has nothing to sample: with identity blocks the output is exactly the source function."""
    op = get_operator("rc-sample")
    assert op.estimator_name == "empirical" and op.sampling == "iid"
    result = grow(tiny("llama-gqa4"), tmp_path / "deep", layers="2x", depth_method="identity", method="rc-sample",
                  verify=True, quiet=True, operator_options={"estimator": "kde"})
    assert result.provenance["verification"]["max_abs_dlogits"] < 1e-5


@pytest.mark.parametrize("estimator", ["kde", "gaussian"])
def test_shrink_stores_a_size_dependent_embedding_for_the_target_size(tiny, tmp_path, estimator):
    """Gemma's embedding is multiplied by sqrt(hidden) at the input. Shrinking with drawn mixtures works on the
    source and target neurons together (n + N), but the stored embedding must follow the target's N: it is the one
    the same weights give as a Llama model (no normaliser; Gemma 1 has Llama's tensor names), times sqrt(n / N)."""
    from growkit import shrink

    gemma = tiny("gemma-untied")
    llama = tmp_path / "as-llama"
    shutil.copytree(gemma, llama)
    config = json.loads((gemma / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", **{k: config[k] for k in keep}}))
    emb = {}
    for name, src in (("gemma", gemma), ("llama", llama)):
        out = shrink(src, tmp_path / name, hidden=16, method="rc-sample", quiet=True,
                     operator_options={"estimator": estimator}).out_dir
        emb[name] = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    expected = emb["llama"] * (32 / 16) ** 0.5
    assert float((emb["gemma"] - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
