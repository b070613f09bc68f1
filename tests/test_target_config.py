"""Configs are checked by the installed transformers before a tensor is read: the grown (or shrunk) model's config
must load as the planned model, or the run is refused in one line naming transformers' rule and the nearest sizes
that pass (issue 17); the source's config values, tokenizer and generation files are checked too (issue 11, 13)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cli_util import assert_nothing_written, error_line, run_cli_batch
from conftest import save_tiny, tiny_config
from growkit import grow, grow_model, run_recipe, shrink
from growkit.errors import GrowkitError

FAMILIES = ("gpt2", "llama-tied", "mistral", "qwen2", "qwen3")

#: The tiny sources have hidden 32, 4 heads of 8. Per family, a width request transformers does not load as the
#: planned model, and the rule it names. Mistral, Qwen2 and Qwen3 (transformers 5.24) state head_dim in the config
#: and tie it to nothing, so they accept every such size: there the same request must pass and load.
REFUSED = {
    "gpt2": (["--hidden", "40", "--method", "net2net"], "GPT2Config reads these sizes as head_dim 10 (not 8)"),
    "llama-tied": (["--hidden", "42", "--method", "net2net"],
                   "LlamaConfig.validate_architecture: The hidden size (42) is not a multiple of the number of "
                   "attention heads (4)."),
}
ACCEPTED = ["--hidden", "42", "--method", "net2net"]

#: Per family's config keys: a bad value for each (item 13), and what the one-line refusal must say.
GPT2_KEYS = dict(heads="n_head", layers="n_layer", eps="layer_norm_epsilon", positions="n_positions",
                 act="activation_function")
LLAMA_KEYS = dict(heads="num_attention_heads", layers="num_hidden_layers", eps="rms_norm_eps",
                  positions="max_position_embeddings", act="hidden_act")
BAD_VALUES = {
    "heads": (4.5, "config: {key} is 4.5; it must be a whole number"),
    "layers": (True, "config: {key} is true; it must be a whole number"),
    "eps": (float("nan"), "{key} is nan; it must be a finite positive number"),
    "positions": (-5, "{key} is -5; it must be a positive integer"),
    "act": (5, "refuses it ({cls}.{key}: Field '{key}' expected str, got int (value: 5))"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("target-config-src")
    return {name: save_tiny(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def refusals(sources, tmp_path_factory) -> dict[str, tuple[Path, object, object]]:
    """Each refused request run for real and as a dry run, in one batch: (output, run, dry run) per family."""
    root = tmp_path_factory.mktemp("target-config-out")
    jobs = []
    for name, (request, _) in REFUSED.items():
        jobs += [["grow", sources[name], "-o", root / name, *request, "--quiet"],
                 ["grow", sources[name], "-o", root / f"{name}-dry", *request, "--dry-run", "--quiet"]]
    results = run_cli_batch(jobs)
    return {name: (root / name, results[2 * i], results[2 * i + 1]) for i, name in enumerate(REFUSED)}


def _loads_as(out: Path, sizes: dict[str, int]) -> None:
    """transformers loads `out` with no missing or unexpected weight, with the sizes asked for."""
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    config = model.config
    for key, value in sizes.items():
        name = {"hidden": "hidden_size", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}[key]
        assert getattr(config, name, config.num_attention_heads) == value, (key, config)


def _options(text: str) -> dict[str, int]:
    """`--heads 12 --kv-heads 4` -> {"heads": 12, "kv_heads": 4}."""
    words = text.split()
    return {words[i].removeprefix("--").replace("-", "_"): int(words[i + 1]) for i in range(0, len(words), 2)}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unloadable_target_is_refused_with_suggestions_that_load(name, sources, refusals, tmp_path):
    out, run, dry = refusals[name]
    request, rule = REFUSED[name]
    for result in (run, dry):
        line = error_line(result.returncode, result.stderr, sources[name], "config would not load", rule,
                          "nearest sizes that pass")
        assert result.returncode == 2
    assert_nothing_written(out)
    suggestions = re.findall(r"`([^`]+)`", line)
    assert suggestions, line
    jobs = [["grow", sources[name], "-o", tmp_path / f"s{i}", *request, *s.split(), "--quiet"]
            for i, s in enumerate(suggestions)]
    for i, (suggestion, result) in enumerate(zip(suggestions, run_cli_batch(jobs))):
        assert result.returncode == 0, (suggestion, result.stderr)
        _loads_as(tmp_path / f"s{i}", _options(suggestion))


def test_the_issue_case_suggests_proportional_heads():
    """SmolLM2-135M's shape (hidden 576, 9 heads, 3 kv heads of 64) grown to hidden 768 by net2net: Llama refuses
    768 / 9; the suggestion keeps head_dim and the GQA ratio (12 heads, 4 kv heads), or a hidden size 9 divides.
    Planned from a config and tensor headers only (the weights are never touched), so no 135M download is needed."""
    from growkit.checkpoint.reader import StateDictCheckpoint
    from growkit.pipeline import plan_growth

    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=64,
                                  tie_word_embeddings=True).to_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    ckpt = StateDictCheckpoint(model.state_dict(), config)
    with pytest.raises(GrowkitError) as caught:
        plan_growth(ckpt, hidden=768, method="net2net")
    message = str(caught.value)
    assert "The hidden size (768) is not a multiple of the number of attention heads (9)" in message
    assert "nearest sizes that pass: `--heads 12 --kv-heads 4`, `--hidden 765`, `--hidden 774`" in message
    assert plan_growth(ckpt, hidden=768, heads=12, kv_heads=4, method="net2net").plan.target.head_dim == 64


@pytest.mark.parametrize("name", [f for f in FAMILIES if f not in REFUSED])
def test_sizes_transformers_accepts_are_not_refused(name, sources, tmp_path):
    result = grow(sources[name], tmp_path / "out", hidden=42, method="net2net", quiet=True)
    _loads_as(result.out_dir, {"hidden": 42, "heads": 4})


@pytest.mark.parametrize("name", list(REFUSED))
def test_python_api_and_recipes_refuse_the_same(name, sources, tmp_path):
    request = _options(" ".join(REFUSED[name][0][:2]))
    rule = REFUSED[name][1]
    with pytest.raises(GrowkitError, match=re.escape(rule)):
        grow(sources[name], tmp_path / "grown", **request, method="net2net", quiet=True)
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    with pytest.raises(GrowkitError, match=re.escape(rule)):
        grow_model(model, **request, method="net2net")
    smaller = {"gpt2": dict(hidden=24), "llama-tied": dict(hidden=30)}[name]  # head_dim 6; 30 / 4 heads
    with pytest.raises(GrowkitError, match="shrunk model's config would not load"):
        shrink(sources[name], tmp_path / "shrunk", **smaller, quiet=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"source: {sources[name]}\nout: {tmp_path / 'recipe-out'}\n"
                      f"grow:\n  hidden: {request['hidden']}\n  method: net2net\n")
    with pytest.raises(GrowkitError, match=re.escape(rule)):
        run_recipe(recipe, dry_run=True)
    assert not any((tmp_path / n).exists() for n in ("grown", "shrunk", "recipe-out"))


@pytest.fixture(scope="module")
def bad_sources(sources, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("bad-config")
    made = {}
    for name in FAMILIES:
        keys = GPT2_KEYS if name == "gpt2" else LLAMA_KEYS
        for what, (value, _) in BAD_VALUES.items():
            dst = root / f"{name}-{what}"
            shutil.copytree(sources[name], dst)
            config = json.loads((dst / "config.json").read_text())
            config[keys[what]] = value
            (dst / "config.json").write_text(json.dumps(config))
            made[name, what] = dst
    return made


def test_source_config_values_are_checked(bad_sources, tmp_path):
    cases = list(bad_sources.items())
    results = run_cli_batch([["grow", src, "-o", tmp_path / src.name, "--width", "2x", "--quiet"]
                             for _, src in cases])
    for ((name, what), src), result in zip(cases, results):
        key = (GPT2_KEYS if name == "gpt2" else LLAMA_KEYS)[what]
        expected = BAD_VALUES[what][1].format(key=key, cls=type(tiny_config(name)).__name__)
        if (name, what) == ("gpt2", "positions"):  # GPT-2's position table is a tensor: its shape says it first
            expected = "tensor transformer.wpe.weight has shape [64, 32], but the config implies [-5, 32]"
        error_line(result.returncode, result.stderr, src, expected)
        assert result.returncode == 2
        assert_nothing_written(tmp_path / src.name)


@pytest.mark.parametrize("file", ["tokenizer.json", "generation_config.json"])
def test_corrupt_tokenizer_or_generation_file_is_refused(file, sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["llama-tied"], src)
    (src / file).write_text('{"version": "1.0", "added_tokens": [')  # cut off mid-file
    results = run_cli_batch([["grow", src, "-o", tmp_path / "out", "--width", "2x", "--quiet"],
                             ["grow", src, "-o", tmp_path / "out", "--width", "2x", "--dry-run", "--quiet"]])
    for result in results:
        error_line(result.returncode, result.stderr, src / file, "not valid JSON")
        assert result.returncode == 2
    assert_nothing_written(tmp_path / "out")


def test_verify_says_when_the_tokenizer_does_not_load(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["gpt2"], src)
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerFast"}))
    plain = tmp_path / "plain"
    results = run_cli_batch([["grow", src, "-o", tmp_path / "out", "--width", "2x", "--verify", "--quiet"],
                             ["grow", sources["gpt2"], "-o", plain, "--width", "2x", "--verify", "--quiet"]])
    for result in results:
        assert result.returncode == 0, result.stderr
    assert "note: --verify compared on random tokens: its tokenizer did not load (ValueError" in results[0].stderr
    tokens = json.loads((tmp_path / "out" / "growkit.json").read_text())["verification"]["tokens"]
    assert tokens.startswith("random tokens") and "its tokenizer did not load (ValueError" in tokens
    assert "random tokens" in results[0].stdout and "tokenizer did not load" in results[0].stdout
    # Without any tokenizer, random tokens are the plan, not a fallback: said in the record, no note.
    assert "note:" not in results[1].stderr
    assert "the checkpoint has no tokenizer" in json.loads((plain / "growkit.json").read_text())["verification"][
        "tokens"]
