"""Exact growth, asserted numerically: max |Δlogits| between source and grown model, loaded by transformers."""

from __future__ import annotations

import pytest

from growkit import grow

FAMILIES = ["gpt2", "gpt2-untied", "llama-gqa4", "llama-mha", "llama-tied", "mistral", "qwen2"]


def _check(result, tol: float) -> dict:
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert v["max_abs_dlogits"] <= tol, v
    return v


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", ["2x", "3x"])
def test_clone_width_is_exact(tiny, tmp_path, family, width):
    result = grow(tiny(family), tmp_path / "out", width=width, method="clone", verify=True, quiet=True)
    _check(result, 1e-5)
    factor = int(width[0])
    assert result.plan.target.hidden == 32 * factor and result.plan.target.heads == 4 * factor


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_depth_is_exact(tiny, tmp_path, family):
    result = grow(tiny(family), tmp_path / "out", layers="2x", depth_method="identity", verify=True, quiet=True)
    _check(result, 1e-5)
    assert result.plan.target.layers == 4
    assert result.provenance["identity_layers"] == [1, 3]


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa4"])
def test_clone_with_symmetric_noise_stays_exact_and_breaks_symmetry(tiny, tmp_path, family):
    import transformers as T

    result = grow(tiny(family), tmp_path / "out", width="2x", noise_snr_db=10, verify=True, quiet=True)
    _check(result, 1e-5)
    plain = grow(tiny(family), tmp_path / "plain", width="2x", quiet=True)
    a = T.AutoModelForCausalLM.from_pretrained(result.out_dir).state_dict()
    b = T.AutoModelForCausalLM.from_pretrained(plain.out_dir).state_dict()
    moved = [n for n in a if (a[n] - b[n]).abs().max() > 1e-4]
    assert moved, "noise changed no weight"


@pytest.mark.parametrize("family", ["llama-gqa4", "llama-mha", "llama-tied", "mistral", "qwen2"])
def test_copy_pad_is_exact_on_rmsnorm_models(tiny, tmp_path, family):
    result = grow(tiny(family), tmp_path / "out", width="2x", method="copy-pad", verify=True, quiet=True)
    _check(result, 1e-4)


def test_copy_pad_on_layernorm_reports_its_gap(tiny, tmp_path):
    result = grow(tiny("gpt2"), tmp_path / "out", width="2x", method="copy-pad", verify=True, quiet=True)
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert v["max_abs_dlogits"] > 1e-5  # LayerNorm statistics change when the stream is zero-padded


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa4", "qwen2"])
def test_net2net_non_integer_width_loads_and_reports(tiny, tmp_path, family):
    # hidden 32 -> 48 (and heads 4 -> 6) is not an integer ratio: only net2net can do it.
    # kv heads stay (1 or 2), so the query groups grow from 4 to 6 or from 2 to 3 heads.
    ffn = 192 if family == "gpt2" else 72
    result = grow(tiny(family), tmp_path / "out", hidden=48, heads=6, ffn=ffn, method="net2net", verify=True,
                  quiet=True)
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert result.plan.target.hidden == 48
    assert abs(v["dloss"]) < 0.5


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa4"])
@pytest.mark.parametrize("depth", ["stack", "interleave"])
def test_stack_and_interleave_load(tiny, tmp_path, family, depth):
    result = grow(tiny(family), tmp_path / "out", layers=5, depth_method=depth, verify=True, quiet=True)
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    expected = [0, 1, 0, 1, 0] if depth == "stack" else [0, 0, 0, 1, 1]
    assert result.provenance["layer_map"] == expected
