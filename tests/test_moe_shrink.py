"""Fewer and more routed experts of MoE checkpoints (`shrink --experts`, `grow --experts`) and importance-based neuron
shrinking of MoE models (`shrink --method subclone`, each expert its own neurons).

Sources are tiny Mixtral / Qwen2-MoE / Qwen3-MoE models as transformers saves them (per-expert layout), with the
repository's test tokenizer so calibration text can be read. Every output is loaded with transformers'
AutoModelForCausalLM (no missing or unexpected keys); exact cases are checked to max |dlogits| <= 1e-5 x max |logit|.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import growkit
from cli_util import assert_nothing_written, error_line, run_cli_batch
from conftest import randomize, save_tiny
from growkit.arch.moe import LAYOUTS
from growkit.train.data import stdlib_text
from growkit.upcycle import upcycle
from growkit.verify import compare, load_grown, random_tokens

TOL = 1e-5
TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "tokenizer"
_COMMON = dict(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "qwen2_moe": lambda: Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=8,
                                        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                        **_COMMON),  # raw top-k weights (norm_topk_prob False), shared expert 2 blocks
    "qwen3_moe": lambda: Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=8, num_experts=4,
                                        num_experts_per_tok=2, head_dim=8, norm_topk_prob=True, **_COMMON),
}


def _save(config, path: Path) -> Path:
    torch.manual_seed(0)
    randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(path)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-sources")
    return {name: _save(make(), root / name) for name, make in CONFIGS.items()}


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_text("train", max_bytes=6_000), encoding="utf-8")
    return path


def _gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    c = compare(a, b, random_tokens(a.config.vocab_size, seed=7, length=32))
    return c["max_abs_dlogits"] / c["max_abs_logit"]


def _experts(model: torch.nn.Module) -> tuple[int, int]:
    c = model.config
    return (c.num_local_experts if c.model_type == "mixtral" else c.num_experts), c.num_experts_per_tok


# --- fewer experts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_removing_copies_undoes_duplication_exactly(tmp_path: Path, sources: dict[str, Path], name: str) -> None:
    """4 experts copied to 8 (top-4), then `shrink --experts 4`: growkit finds the copies from the weights and router
    rows, keeps one of each with top-k 2, and the model is the source again (raw top-k weights too). Keeping top-k 3
    is said to be inexact, and is."""
    src = sources[name]
    source, _ = load_grown(src)
    doubled = upcycle(src, tmp_path / "x2", experts=8, quiet=True).out_dir
    config = json.loads((doubled / "config.json").read_text())  # as `growkit train` exports a MoE: router logits on,
    (doubled / "config.json").write_text(json.dumps(dict(config, output_router_logits=True)))  # so .loss has aux
    back = growkit.shrink(doubled, tmp_path / "back", experts=4, quiet=True, verify=True)
    model, info = load_grown(back.out_dir)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    assert abs(back.provenance["verification"]["dloss"]) <= 1e-5  # language-model losses, not 8 vs 4 experts' aux
    assert back.provenance["exact_at_step_0"] and back.provenance["experts_kept"]["ranked_by"] == "copies"
    assert _experts(model) == (4, 2)
    assert _gap(source, model) <= TOL
    other = growkit.shrink(doubled, tmp_path / "k3", experts=4, top_k=3, quiet=True)
    assert not other.provenance["exact_at_step_0"] and "top-k" in other.provenance["not_exact_because"][0]
    assert _gap(source, load_grown(other.out_dir)[0]) > TOL


def test_experts_of_a_fresh_upcycle_are_interchangeable(tmp_path: Path) -> None:
    """A fresh upcycle (granularity 1) has identical experts with their own router rows: with renormalised top-k
    weights (Mixtral) any subset computes the same, so 4 -> 2 experts is exact although nothing is a copy."""
    dense = save_tiny("llama-gqa4", tmp_path / "dense")
    moe = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, quiet=True).out_dir
    result = growkit.shrink(moe, tmp_path / "two", experts=2, quiet=True)
    model, info = load_grown(result.out_dir)
    assert info == {"missing_keys": [], "unexpected_keys": []} and _experts(model) == (2, 2)
    assert result.provenance["exact_at_step_0"] and result.provenance["experts_kept"]["ranked_by"] == "weights"
    assert _gap(load_grown(moe)[0], model) <= TOL


def _plant(src: Path, out: Path, loud: int, silent: int) -> Path:
    """A copy of `src` whose expert `loud` writes 4x more in every layer and expert `silent` nothing."""
    model, _ = load_grown(src)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[loud] *= 4
            layer.mlp.experts.down_proj[silent] = 0
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_fewer_experts_keep_the_important_ones_and_say_it_is_inexact(tmp_path: Path, sources: dict[str, Path],
                                                                    calib: Path, capsys) -> None:
    """Distinct experts: `shrink --experts 2` with calibration text keeps, in every layer, the expert planted to write
    most and drops the silent one (routed weight x output norm on the text), announces the result as inexact on
    stderr and in growkit.json, records how the experts were ranked, and --verify measures the gap, smaller than
    keeping evenly strided experts (`--method select`, which here keeps the silent one)."""
    src = _plant(sources["qwen3_moe"], tmp_path / "planted", loud=1, silent=2)
    runs = {method: growkit.shrink(src, tmp_path / method, experts=2, method=method, verify=True, quiet=True,
                                   **({"calibration": [calib]} if method == "subclone" else {}))
            for method in ("subclone", "select")}
    err = capsys.readouterr().err
    ranked = runs["subclone"].provenance["experts_kept"]
    assert ranked["ranked_by"] == "activations"
    assert all(1 in kept and 2 not in kept for kept in ranked["per_layer"]), ranked
    assert runs["select"].provenance["experts_kept"] == {"ranked_by": "strided", "per_layer": [[0, 2], [0, 2]]}
    assert "not exact at step 0" in err and "not copies of kept ones" in err
    gaps = {}
    for method, result in runs.items():
        p = result.provenance
        assert not p["exact_at_step_0"] and p["not_exact_because"]
        v = p["verification"]
        assert v["missing_keys"] == [] and v["unexpected_keys"] == []
        gaps[method] = v["max_abs_dlogits"] / v["max_abs_logit"]
        assert gaps[method] > TOL
    assert gaps["subclone"] < gaps["select"], gaps
    weights = growkit.shrink(src, tmp_path / "weights", experts=2, quiet=True).provenance["experts_kept"]
    assert weights["ranked_by"] == "weights" and all(2 not in kept for kept in weights["per_layer"])
    assert "no calibration text" in capsys.readouterr().err


# --- the command line: grow --experts and the refusals ------------------------------------------------------------

def test_cli_grows_experts_exactly_and_refuses_in_one_line(tmp_path: Path, sources: dict[str, Path]) -> None:
    """`growkit grow MOE --experts 8` is the exact duplication; every request --experts cannot carry out, or an
    option it would have to ignore, exits 2 with one line naming the source and writes nothing."""
    src = sources["mixtral"]
    dense = save_tiny("llama-gqa4", tmp_path / "dense")
    o = tmp_path / "out"
    bad = [
        (["shrink", src, "-o", o, "--experts", "2", "--width", "0.5x"], src, "--width", "two commands"),
        (["grow", src, "-o", o, "--experts", "8", "--layers", "2x"], src, "--layers", "two commands"),
        (["shrink", src, "-o", o, "--experts", "1"], src, "--top-k 2", "--experts 1"),
        (["shrink", src, "-o", o, "--experts", "3", "--top-k", "4"], src, "--top-k 4"),
        (["grow", src, "-o", o, "--experts", "2"], src, "4 experts", "give more"),
        (["shrink", src, "-o", o, "--experts", "2", "--method", "rc-sample"], src, "subclone", "select"),
        (["shrink", src, "-o", o, "--top-k", "1"], src, "--top-k goes with --experts"),
        (["shrink", dense, "-o", o, "--experts", "2"], dense, "no routed experts", "upcycle"),
    ]
    runs = run_cli_batch([args for args, *_ in bad] + [["grow", src, "-o", tmp_path / "x2", "--experts", "8"]])
    for run, (args, *fragments) in zip(runs, bad):
        assert run.returncode == 2, (args, run.stderr)
        error_line(run.returncode, run.stderr, *fragments)
    assert_nothing_written(o)
    ok = runs[-1]
    assert ok.returncode == 0, ok.stderr
    assert "8 experts, top-4" in ok.stdout and "exact at step 0: yes" in ok.stdout
    grown, info = load_grown(tmp_path / "x2")
    assert info == {"missing_keys": [], "unexpected_keys": []} and _experts(grown) == (8, 4)
    assert _gap(load_grown(src)[0], grown) <= TOL
    assert json.loads((tmp_path / "x2" / "growkit.json").read_text())["kind"] == "grow"
    with safe_open(tmp_path / "x2" / "model.safetensors", "pt") as f:
        assert LAYOUTS["mixtral"].expert(7, "down_proj").format(1) in f.keys()


# --- subclone on MoE models: each expert keeps its own neurons ---------------------------------------------------

#: the four neurons (of 8) each expert is planted to need: no one set of positions serves every expert
NEEDED = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6], [1, 3, 5, 7]]


def _plant_neurons(src: Path, out: Path) -> Path:
    """A copy of `src` where, in every layer, expert e's `NEEDED[e]` neurons write 8x more and its other neurons
    nothing (and the shared expert's neuron 7 of its first block writes 8x more)."""
    model, _ = load_grown(src)
    with torch.no_grad():
        for layer in model.model.layers:
            down = layer.mlp.experts.down_proj  # [experts, hidden, ffn]
            for e, needed in enumerate(NEEDED):
                silent = [j for j in range(8) if j not in needed]
                down[e][:, needed] *= 8
                down[e][:, silent] = 0
            if hasattr(layer.mlp, "shared_expert"):
                layer.mlp.shared_expert.down_proj.weight[:, 7] *= 8
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _kept_columns(src: Path, out: Path, name: str) -> list[int]:
    """Which source columns (neurons) a shrunk down projection holds, matched exactly (rescale none)."""
    with safe_open(src / "model.safetensors", "pt") as f:
        old = f.get_tensor(name)
    with safe_open(out / "model.safetensors", "pt") as f:
        new = f.get_tensor(name)
    return [next(j for j in range(old.shape[1]) if torch.equal(old[:, j], new[:, i])) for i in range(new.shape[1])]


@pytest.mark.parametrize("name,importance", [("mixtral", "weights"), ("qwen2_moe", "activations"),
                                             ("qwen3_moe", "weights")])
def test_subclone_keeps_each_experts_own_neurons(tmp_path: Path, sources: dict[str, Path], calib: Path, name: str,
                                                 importance: str) -> None:
    """`shrink --method subclone --ffn 4` of a MoE model: every routed expert keeps exactly the neurons planted to
    matter in it (each expert its own map: no one set of positions would serve them all), the shared expert keeps its
    own planted neuron in each of its blocks, and the output loads in transformers with no missing or unexpected
    keys."""
    src = _plant_neurons(sources[name], tmp_path / "planted")
    extra = {"calibration": [calib]} if importance == "activations" else {}
    result = growkit.shrink(src, tmp_path / "out", ffn=4, method="subclone", rescale="none", verify=True,
                            quiet=True, **extra)
    p = result.provenance
    assert p["options"]["importance"] == importance
    assert p["verification"]["missing_keys"] == [] and p["verification"]["unexpected_keys"] == []
    layout = LAYOUTS[CONFIGS[name]().model_type]
    for layer in range(2):
        for e in range(4):
            kept = _kept_columns(src, result.out_dir, layout.expert(e, "down_proj").format(layer))
            assert kept == NEEDED[e], (layer, e, kept)
        if layout.shared:
            kept = _kept_columns(src, result.out_dir, layout.shared_expert("down_proj").format(layer))
            assert 7 in kept and 15 in kept, kept  # position 7 of both blocks: one map on the expert's ffn axis


@pytest.mark.parametrize("name", CONFIGS)
def test_subclone_grows_moe_models_exactly(tmp_path: Path, sources: dict[str, Path], name: str) -> None:
    """Growing with subclone duplicates each expert's own top-ranked neurons (different positions per expert) and
    divides their readers: the grown MoE model computes the source's logits."""
    src = sources[name]
    config = CONFIGS[name]()
    ffn = getattr(config, LAYOUTS[config.model_type].ffn_key)
    result = growkit.grow(src, tmp_path / "out", hidden=40, ffn=ffn * 3 // 2, method="subclone", quiet=True)
    grown, info = load_grown(result.out_dir)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    assert _gap(load_grown(src)[0], grown) <= TOL
