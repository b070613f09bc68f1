"""Recipes: validation errors name the field, the shipped recipes run, overrides and paths behave as documented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from cli_helper import REPO, run_cli
from cli_util import start_paused
from growkit.errors import GrowkitError
from hub_fixtures import hub, hub_env, tiny_gpt2, tiny_llama  # noqa: F401 (fixtures)
from growkit.recipe import load_recipe, parse_set, run_recipe
from localhub import TOKEN

RECIPES = REPO / "recipes"
GPT2_MEDIUM = RECIPES / "gpt2-small-to-medium.yaml"


@pytest.fixture(scope="module")
def gpt2_small_shape(tmp_path_factory):
    """A checkpoint with GPT-2 small's exact config and tensor layout (124,439,808 parameters).

    The weights are fp16 zeros built from the meta device: a dry run reads only the config and safetensors headers,
    so the values do not matter, and this takes about a second instead of initialising 124M random weights.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2-small-shape")
    config = GPT2Config()
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    state = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 250 MB: do not leave it for pytest's tmp retention


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the GPT-2 small -> medium shape recipe (dry run) ---------------------------------------------------------------

def test_gpt2_medium_recipe_dry_run_plans_the_medium_shape(gpt2_small_shape, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_recipe(GPT2_MEDIUM, dry_run=True, overrides={"source": str(gpt2_small_shape)})
    target, source = result.plan.target, result.plan.source
    assert (source.hidden, source.heads, source.ffn, source.layers) == (768, 12, 3072, 12)
    assert (target.hidden, target.heads, target.ffn, target.layers, target.head_dim) == (1024, 16, 4096, 24, 64)
    assert result.plan.method == "net2net" and result.plan.depth_method == "stack"
    assert "  parameters 124,439,808 -> 354,823,168 (2.85x); method net2net, depth stack" in result.summary
    assert result.out_dir == tmp_path / "out" / "gpt2-small-to-medium"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_gpt2_medium_recipe_dry_run_cli(gpt2_small_shape, tmp_path):
    done = run_cli(["run", str(GPT2_MEDIUM), "--source", str(gpt2_small_shape), "--dry-run"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hidden        768 -> 1024" in done.stdout and "layers         12 -> 24" in done.stdout
    assert "dry run: recipe, source and plan are valid; nothing was written" in done.stdout
    missing = run_cli(["run", str(GPT2_MEDIUM), "--dry-run"], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"error: {GPT2_MEDIUM}: source: not set; give it in the recipe or on the "
                                      "command line with --source PATH")


def test_gpt2_medium_recipe_refuses_a_source_of_another_shape(tiny_gpt2, tmp_path, monkeypatch):
    """hidden 1024 with 16 heads means head_dim 64; a tiny GPT-2 (head_dim 8) cannot be grown to it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GrowkitError, match=r"gpt2-small-to-medium\.yaml: grow: .*head_dim"):
        run_recipe(GPT2_MEDIUM, dry_run=True, overrides={"source": str(tiny_gpt2)})


# --- validation errors name the field -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text,expected",
    [
        ("grwo: {width: 2}\n", "grwo: unknown field (did you mean grow?); grow: required field is missing"),
        ("grow: {width: 2, sed: 1}\n", "grow.sed: unknown field (did you mean seed?)"),
        ("grow: {}\n", "grow: give width or at least one of hidden, ffn, heads, kv_heads, layers"),
        ("grow: {hidden: -4}\n", "grow.hidden: Input should be greater than 0"),
        ("grow: {width: [2]}\n", "grow.width.float: Input should be a valid number"),
        ("grow: {width: 2, method: magic}\n", "grow.method: unknown method 'magic'; choose one of clone, copy-pad"),
        ("grow: {width: 2, depth_method: sideways}\n", "grow.depth_method: unknown depth method 'sideways'"),
        ("grow: {width: 2}\neval: {data: []}\n", "eval.data: List should have at least 1 item"),
        ("grow: {width: 2}\neval: {data: [a.txt], seq_len: long}\n", "eval.seq_len: Input should be a valid integer"),
        ("grow: {width: 2}\neval: {}\n", "eval.data: required field is missing"),
        ("grow: {width: 2}\npush: {repo_id: no-namespace}\n", "push.repo_id: String should match pattern"),
        ("grow: {width: 2}\npush: {repo_id: a/b, token: hf_x}\n", "push: token: a token does not belong in a recipe"),
        ("grow: {width: 2}\noverwrite: sometimes\n", "overwrite: Input should be a valid boolean"),
        ("- grow\n", "a recipe is a YAML mapping with at least `grow:`"),
        ("grow: {width: 2\n", "not valid YAML"),
    ],
)
def test_invalid_recipe_error_names_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(GrowkitError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_invalid_recipe_on_the_command_line(tmp_path):
    path = write(tmp_path, "source: x\ngrow: {width: 2, mehtod: clone}\n")
    done = run_cli(["run", str(path), "--dry-run"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {path}: grow.mehtod: unknown field (did you mean method?)"


def test_missing_data_and_existing_output_are_caught_in_a_dry_run(tiny_gpt2, tmp_path):
    path = write(tmp_path, f"source: {tiny_gpt2}\ngrow: {{width: 2}}\neval: {{data: [held-out.txt]}}\n")
    with pytest.raises(GrowkitError, match=rf"eval\.data: {tmp_path}/held-out\.txt: no such file"):
        run_recipe(path, dry_run=True)
    bad = write(tmp_path, f"source: {tiny_gpt2}\ngrow: {{width: 2}}\neval: {{data: ['stdlib:test']}}\n")
    with pytest.raises(GrowkitError, match=r"eval\.data: 'stdlib:test': expected stdlib:train or stdlib:val"):
        run_recipe(bad, dry_run=True)
    (tmp_path / "taken").mkdir()
    ok = write(tmp_path, f"source: {tiny_gpt2}\nout: taken\ngrow: {{width: 2}}\n")
    with pytest.raises(GrowkitError, match=r"taken: output already exists \(set overwrite: true or pass --overwrite\)"):
        run_recipe(ok, dry_run=True)
    assert run_recipe(ok, dry_run=True, overrides={"overwrite": True}).plan.target.hidden == 64


# --- paths and overrides --------------------------------------------------------------------------------------------

def test_paths_resolve_against_the_recipe_and_overrides_against_the_cwd(tiny_gpt2, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copytree(tiny_gpt2, tmp_path / "models" / "src")
    path = write(recipes, "source: ../models/src\nout: ../out/x\ngrow: {width: 2}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    assert Path(recipe.source) == recipes / ".." / "models" / "src"
    assert Path(recipe.out) == recipes / ".." / "out" / "x"
    overridden = load_recipe(path, {"out": "here", "grow.seed": 5, "grow.method": "net2net"})
    assert Path(overridden.out) == elsewhere / "here"
    assert overridden.grow.seed == 5 and overridden.grow.method == "net2net"
    assert overridden.as_written()["out"] == "here"  # the card shows what the user wrote, not resolved paths
    assert overridden.as_written()["source"] == "../models/src"


def test_parse_set_reads_yaml_values():
    assert parse_set(["grow.seed=3", "push=null", "grow.width=1.5x", "eval.data=[a, b]"]) == {
        "grow.seed": 3, "push": None, "grow.width": "1.5x", "eval.data": ["a", "b"]}
    with pytest.raises(GrowkitError, match="expected KEY=VALUE"):
        parse_set(["grow.seed"])


# --- a full run with a push to the local Hub ------------------------------------------------------------------------

def test_recipe_run_grows_writes_provenance_and_pushes(hub, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = write(tmp_path, f"""
description: tiny llama, wider and deeper
source: {tiny_llama}
base_model: acme/tiny-llama
out: grown
grow: {{width: 2x, layers: 4, depth_method: identity, max_shard_size: 200KB}}
push: {{repo_id: alice/tiny-llama-grown, endpoint: {hub.endpoint}, commit_message: from a recipe}}
""")
    result = run_recipe(path, overrides={"grow.seed": 3}, quiet=True)

    out = tmp_path / "grown"
    assert result.out_dir == out
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["sizes"]["hidden"] == [32, 64] and prov["sizes"]["layers"] == [2, 4]
    assert prov["identity_layers"] == [1, 3] and prov["options"]["seed"] == 3
    assert prov["verification"]["max_abs_dlogits"] < 1e-4  # identity depth + clone width preserve the function
    assert prov["command"] == f"growkit run {path} --set grow.seed=3"
    assert prov["recipe"]["grow"] == {"width": "2x", "layers": 4, "depth_method": "identity",
                                      "max_shard_size": "200KB", "seed": 3}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "acme/tiny-llama"
    assert "```yaml\ndescription: tiny llama, wider and deeper\n" in card.text
    assert f"growkit run {path} --set grow.seed=3" in card.text
    # Pushed: the sharded checkpoint, its card and provenance arrive byte-identical.
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len([n for n in local if n.endswith(".safetensors")]) > 1
    assert hub.files("alice/tiny-llama-grown") == local
    assert hub.repos["alice/tiny-llama-grown"].commits[-1]["summary"] == "from a recipe"
    assert result.pushed.commit_url.startswith(f"{hub.endpoint}/alice/tiny-llama-grown/commit/")


def test_push_without_a_token_fails_before_growing(hub, tiny_gpt2, tmp_path):
    path = write(tmp_path, f"source: {tiny_gpt2}\nout: o\ngrow: {{width: 2}}\n"
                           f"push: {{repo_id: a/b, endpoint: {hub.endpoint}}}\n")
    with pytest.raises(GrowkitError, match="no Hugging Face token"):
        run_recipe(path, quiet=True)
    assert not (tmp_path / "o").exists() and hub.requests == []


def test_no_push_override_skips_the_push(hub, tiny_gpt2, tmp_path):
    path = write(tmp_path, f"source: {tiny_gpt2}\ngrow: {{width: 2}}\n"
                           f"push: {{repo_id: a/b, endpoint: {hub.endpoint}}}\n")
    result = run_recipe(path, overrides={"push": None, "out": str(tmp_path / "o")}, quiet=True)
    assert result.pushed is None and hub.requests == []
    command = json.loads((tmp_path / "o" / "growkit.json").read_text())["command"]
    assert command == f"growkit run {path} --no-push --out {tmp_path / 'o'}"


# --- the shipped tiny recipes, run in full on the bundled models -----------------------------------------------------

@pytest.mark.parametrize("name,layers,identity", [("tiny-gpt2-width2x", [2, 2], []),
                                                  ("tiny-llama-width2x-identity-depth", [2, 4], [1, 3])])
def test_shipped_tiny_recipe_runs(tmp_path, monkeypatch, name, layers, identity):
    monkeypatch.chdir(tmp_path)
    result = run_recipe(RECIPES / f"{name}.yaml", quiet=True)

    out = tmp_path / "out" / name  # the documented default output
    assert result.out_dir == out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "growkit.json", "README.md"):
        assert (out / f).is_file(), f
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["sizes"]["hidden"] == [64, 128] and prov["sizes"]["layers"] == layers
    assert prov["identity_layers"] == identity
    assert prov["verification"]["max_abs_dlogits"] < 1e-4
    ev = prov["evaluation"]
    assert ev["tokens"] == 64 * 127
    # A trained model (the bundled ones start at 7.64 and end near 3.5-3.8 on this text), and growth kept it exact.
    assert 2.0 < ev["source_loss"] < 5.0
    assert abs(ev["loss"] - ev["source_loss"]) < 1e-4
    assert prov["command"] == f"growkit run {RECIPES / name}.yaml"
    assert prov["recipe"]["source"] == f"../models/{name.split('-width')[0]}"
    card = ModelCard.load(out / "README.md")
    assert {"growkit", "model-growth"} <= set(card.data.tags)
    assert f"- this model: {ev['loss']:.4f}".rstrip("0") in card.text or f"{ev['loss']:.4f}" in card.text


def test_recipe_with_training(tmp_path, tiny_gpt2):
    """grow -> growkit.train -> eval: the card gets the training summary; training lowers the validation loss."""
    text = REPO / "growkit" / "recipe.py"  # real text the tiny tokenizer has never been trained to fit
    path = write(tmp_path, f"""
source: {tiny_gpt2}
out: trained
grow: {{width: 2, noise_snr_db: 20}}
train: {{data: [{text}], steps: 30, lr: 0.003, batch_size: 4, seq_len: 32, seed: 0}}
eval: {{data: [{text}], seq_len: 32, blocks: 16}}
""")
    result = run_recipe(path, quiet=True)
    out = tmp_path / "trained"
    assert (tmp_path / "trained-grown" / "model.safetensors").is_file()  # the grown, untrained checkpoint is kept
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["training"]["steps"] == 30
    assert prov["evaluation"]["loss"] < prov["evaluation"]["source_loss"] - 0.5  # it learned this text
    card = ModelCard.load(out / "README.md").text
    assert "## Training after growth" in card and "- optimizer steps: 30" in card
    assert result.evaluation == prov["evaluation"]


def test_unknown_train_option_names_the_field(tmp_path):
    path = write(tmp_path, "grow: {width: 2}\ntrain: {data: [x.txt], stepz: 3}\n")
    expected = r"r\.yaml: train\.stepz: not an option of growkit\.train \(options: .*steps"
    with pytest.raises(GrowkitError, match=expected):
        load_recipe(path)


def test_float_options_in_exponent_notation_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `3e-3` as a string; the recipe reads it as the number it spells."""
    path = write(tmp_path, "grow: {width: 2}\ntrain: {data: [x.txt], lr: 3e-3, max_grad_norm: 1e0, steps: 3}\n")
    train = load_recipe(path).train
    assert train["lr"] == 0.003 and train["max_grad_norm"] == 1.0 and train["steps"] == 3
    bad = write(tmp_path, "grow: {width: 2}\ntrain: {data: [x.txt], lr: fast}\n", name="bad.yaml")
    with pytest.raises(GrowkitError, match=r"^.*bad\.yaml: train\.lr: 'fast' is not a number$"):
        load_recipe(bad)


def test_interrupted_run_says_so(tmp_path, tiny_gpt2):
    """Ctrl-C during a recipe's training step: one line naming the recipe, exit 130, the grow step's output kept."""
    import signal

    text = REPO / "growkit" / "recipe.py"
    path = write(tmp_path, f"""
source: {tiny_gpt2}
out: trained
grow: {{width: 2}}
train: {{data: [{text}], steps: 100000, batch_size: 2, seq_len: 32, save_every: 2}}
""")
    # The run waits after its first training checkpoint until the signal comes: sending it at a guessed moment was
    # flaky on a busy machine.
    proc = start_paused("checkpoint-saved", tmp_path / "paused", "run", path, "-q", cwd=tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run interrupted by SIGINT" in err and "Traceback" not in err, err
    assert (tmp_path / "trained-grown" / "model.safetensors").is_file()
    assert not (tmp_path / "trained" / "model.safetensors").exists()
