"""Nothing wrong is written with exit status 0: guessed configs are refused or announced, no NaN/Inf reaches an
output, stale weight layouts are refused by every reader, impossible sizes are refused before allocating, and the
original GPT-2 name layout is read like transformers reads it (issue 11, items 4-7, 10-12, 17).

Bad inputs run through the real CLI, batched (`cli_util.run_cli_batch`): each case is its own process with its own
exit status and stderr.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from cli_util import assert_nothing_written, cli_command, cli_env, error_line, run_cli_batch
from conftest import randomize, save_tiny
from test_train import TOKENIZER

from growkit import grow
from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError
from growkit.train.loop import resolve_base_config


@dataclass
class Case:
    args: list[str]
    out: Path
    names: list[str]
    result: subprocess.CompletedProcess[str] | None = field(default=None, repr=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, name: str, index: tuple[int, int], value: float) -> None:
    tensors = load_file(path)
    tensors[name][index] = value
    save_file(tensors, path, metadata={"format": "pt"})


def _stale_layout(llama: Path, root: Path) -> Path:
    """A sharded checkpoint (index + shards) beside a model.safetensors of other weights, left by an older save."""
    src = root / "stale"
    model = T.AutoModelForCausalLM.from_pretrained(llama)
    model.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    other = randomize(T.AutoModelForCausalLM.from_config(model.config), seed=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, src / "model.safetensors",
              metadata={"format": "pt"})
    return src


def _without_prefix(src: Path, dst: Path) -> Path:
    """The original Hub GPT-2 layout: the base model's tensors without `transformer.` (transformers loads it)."""
    _copy(src, dst)
    tensors = load_file(src / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


def _gpt2_with_tokenizer(path: Path) -> Path:
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=2048, n_positions=64, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    randomize(T.AutoModelForCausalLM.from_config(cfg)).save_pretrained(path)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _qwen3_bare(path: Path) -> Path:
    """A bare Qwen3 file: its per-head q/k norms record head_dim, so the head counts follow from the shapes."""
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=101, head_dim=8,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)
    model = randomize(T.AutoModelForCausalLM.from_config(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def srcs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety-output-src")
    gpt2, llama = save_tiny("gpt2", root / "gpt2"), save_tiny("llama-gqa4", root / "llama")
    big = _copy(llama, root / "big-value")  # one weight beyond float16's range (65504)
    _edit(big / "model.safetensors", "model.embed_tokens.weight", (3, 5), 1e6)
    nan = _copy(llama, root / "nan")
    _edit(nan / "model.safetensors", "model.layers.1.mlp.down_proj.weight", (3, 5), float("nan"))
    bare_llama, bare_gpt2 = root / "llama.safetensors", root / "gpt2.safetensors"
    shutil.copy(llama / "model.safetensors", bare_llama)
    shutil.copy(gpt2 / "model.safetensors", bare_gpt2)
    afile = root / "a-file"
    afile.write_text("not a directory\n")
    layer_scaled = _copy(gpt2, root / "gpt2-layer-scaled")  # a family limit: depth growth is refused
    config = json.loads((layer_scaled / "config.json").read_text())
    (layer_scaled / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    tok_gpt2 = _gpt2_with_tokenizer(root / "gpt2-tok")
    calib = root / "calib.txt"
    calib.write_text((Path(json.__file__).parent / "decoder.py").read_text())
    return {"root": root, "gpt2": gpt2, "llama": llama, "big": big, "nan": nan, "stale": _stale_layout(llama, root),
            "bare_llama": bare_llama, "bare_gpt2": bare_gpt2, "afile": afile, "qwen3": _qwen3_bare(root / "q3.safetensors"),
            "noprefix": _without_prefix(tok_gpt2, root / "gpt2-noprefix"), "calib": calib,
            "layer_scaled": layer_scaled}


def _cases(s: dict[str, Path], root: Path) -> dict[str, Case]:
    g, ll = s["gpt2"], s["llama"]
    cases = {
        "noise_nan": Case(["grow", g, "-o", root / "o-nan-noise", "--width", "2x", "--noise-snr-db", "nan"],
                          root / "o-nan-noise", ["--noise-snr-db", "nan", "at least 0 dB"]),
        "noise_far_below_zero": Case(["grow", g, "-o", root / "o-low", "--width", "2x", "--noise-snr-db", "-1000"],
                                     root / "o-low", ["--noise-snr-db", "-1000", "at least 0 dB"]),
        "fp16_overflow": Case(["grow", s["big"], "-o", root / "o-fp16", "--width", "2x", "--dtype", "fp16"],
                              root / "o-fp16", [s["big"], "model.embed_tokens.weight", "1e+06",
                                                "exceeds float16's range", "--dtype bf16"]),
        "stale_index_grow": Case(["grow", s["stale"], "-o", root / "o-stale", "--width", "2x"], root / "o-stale",
                                 [s["stale"], "both model.safetensors and model.safetensors.index.json",
                                  "remove the stale one"]),
        "stale_index_inspect": Case(["inspect", s["stale"], "-o", root / "o-stale-inspect"],
                                    root / "o-stale-inspect", [s["stale"], "both model.safetensors"]),
        "seed_too_large": Case(["grow", g, "-o", root / "o-seed", "--width", "2x", "--seed",
                                "99999999999999999999999"], root / "o-seed", ["--seed", "99999999999999999999999"]),
        "seed_negative": Case(["grow", g, "-o", root / "o-seed-neg", "--width", "2x", "--seed", "-1"],
                              root / "o-seed-neg", ["--seed", "-1"]),
        "width_beyond_any_disk": Case(["grow", g, "-o", root / "o-huge", "--width", "10000x"], root / "o-huge",
                                      [root / "o-huge", "parameters in float32", "on disk", "is free"]),
        "inspect_permutations": Case(["inspect", g, "--permutations", "-1", "-o", root / "o-perm"], root / "o-perm",
                                     ["--permutations", "-1"]),
        "inspect_out_is_a_file": Case(["inspect", g, "-o", s["afile"]], root / "o-none", [s["afile"],
                                                                                          "not a directory"]),
        "inspect_nan": Case(["inspect", s["nan"], "-o", root / "o-inspect-nan"], root / "o-inspect-nan",
                            [s["nan"], "model.layers.1.mlp.down_proj.weight", "NaN or Inf"]),
        "inspect_seed": Case(["inspect", g, "--seed", "-3", "-o", root / "o-inspect-seed"], root / "o-inspect-seed",
                             ["--seed", "-3"]),
        "bare_llama_heads_unknown": Case(["grow", s["bare_llama"], "-o", root / "o-bare-llama", "--width", "2x"],
                                         root / "o-bare-llama", [s["bare_llama"], "how many attention heads",
                                                                 "--config"]),
        "bare_gpt2_heads_unknown": Case(["grow", s["bare_gpt2"], "-o", root / "o-bare-gpt2", "--width", "2x"],
                                        root / "o-bare-gpt2", [s["bare_gpt2"], "how many attention heads",
                                                               "--config"]),
        "family_limit_refuses_depth": Case(["grow", s["layer_scaled"], "-o", root / "o-limit", "--layers", "2x",
                                             "--depth-method", "identity"], root / "o-limit",
                                            [s["layer_scaled"], "--depth-method identity cannot grow a gpt2 model",
                                             "scale_attn_by_inverse_layer_idx ties each layer's attention scale"]),
    }
    for method in ("clone", "net2net", "copy-pad", "rc-sample"):  # 4 heads share 1 kv head; 2 kv heads would split
        cases[f"kv_heads_{method}"] = Case(["grow", ll, "-o", root / f"o-kv-{method}", "--kv-heads", "2",
                                            "--method", method], root / f"o-kv-{method}",
                                           [ll, "kv heads 1 -> 2", "split each group of 4", "--heads 8"])
    return cases


def _good_runs(s: dict[str, Path], root: Path) -> dict[str, list]:
    return {
        "noprefix_verify": ["grow", s["noprefix"], "-o", root / "ok-noprefix", "--width", "2x", "--verify"],
        "noprefix_subclone": ["shrink", s["noprefix"], "-o", root / "ok-noprefix-shrunk", "--width", "0.5x",
                              "--method", "subclone", "--calibration", s["calib"], "--verify"],
        "qwen3_inferred": ["grow", s["qwen3"], "-o", root / "ok-qwen3", "--width", "2x", "--verify"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, srcs) -> tuple[dict[str, Case], dict[str, subprocess.CompletedProcess[str]]]:
    root = tmp_path_factory.mktemp("safety-output")
    cases, good = _cases(srcs, root), _good_runs(srcs, root)
    jobs = [[*c.args, "--quiet"] for c in cases.values()] + [[*a, "--quiet"] for a in good.values()]
    results = run_cli_batch(jobs)
    for case, result in zip(cases.values(), results):
        case.result = result
    return cases, dict(zip(good, results[len(cases):]))


CASE_NAMES = ["noise_nan", "noise_far_below_zero", "fp16_overflow", "stale_index_grow", "stale_index_inspect",
              "seed_too_large", "seed_negative", "width_beyond_any_disk", "inspect_permutations",
              "inspect_out_is_a_file", "inspect_nan", "inspect_seed", "bare_llama_heads_unknown",
              "bare_gpt2_heads_unknown", "family_limit_refuses_depth", "kv_heads_clone", "kv_heads_net2net", "kv_heads_copy-pad",
              "kv_heads_rc-sample"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_refused_in_one_line_and_nothing_written(runs, name):
    case = runs[0][name]
    assert case.result is not None
    error_line(case.result.returncode, case.result.stderr, *case.names)
    assert case.result.returncode == 2
    assert_nothing_written(case.out)


def test_stale_index_refused_by_the_python_reader_but_an_agreeing_one_is_read(srcs, tmp_path):
    with pytest.raises(GrowkitError, match="both model.safetensors and model.safetensors.index.json"):
        load_checkpoint(srcs["stale"])
    agreeing = _copy(srcs["llama"], tmp_path / "agreeing")
    names = list(load_file(agreeing / "model.safetensors"))
    (agreeing / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    assert sorted(load_checkpoint(agreeing).names()) == sorted(names)


def _out(run: subprocess.CompletedProcess[str]) -> Path:
    return Path(run.args[run.args.index("-o") + 1])


def _verified_gap(stdout: str) -> tuple[float, float]:
    line = next(x for x in stdout.splitlines() if x.startswith("function preservation"))
    gap = float(line.split("max |Δlogits| = ")[1].split()[0])
    top = float(line.split("(max |logit| ")[1].split(")")[0])
    return gap, top


def test_gpt2_without_transformer_prefix_grows_verifies_and_calibrates(runs, srcs):
    good = runs[1]
    for name in ("noprefix_verify", "noprefix_subclone"):
        assert good[name].returncode == 0, good[name].stderr
    grown = _out(good["noprefix_verify"])
    names = list(load_file(grown / "model.safetensors"))
    assert names and all(n.startswith("transformer.") for n in names), names[:3]
    gap, top = _verified_gap(good["noprefix_verify"].stdout)
    assert gap <= 1e-5 * max(top, 1.0), good["noprefix_verify"].stdout
    # transformers reads the grown checkpoint and the unprefixed source alike: same logits as growkit's check saw
    src_model = T.AutoModelForCausalLM.from_pretrained(srcs["noprefix"]).eval()
    grown_model = T.AutoModelForCausalLM.from_pretrained(grown).eval()
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        d = (src_model(ids).logits - grown_model(ids).logits).abs().max() / src_model(ids).logits.abs().max()
    assert float(d) < 1e-5


def test_inferred_config_is_announced_recorded_and_flagged_by_verify(runs, srcs):
    run = runs[1]["qwen3_inferred"]
    assert run.returncode == 0, run.stderr
    note = [x for x in run.stderr.splitlines() if x.startswith("growkit: note:")]
    assert len(note) == 1 and "has no config; inferred from its tensor shapes" in note[0], run.stderr
    for fragment in ("num_attention_heads=4", "num_key_value_heads=2", "head_dim=8", "rms_norm_eps", "rope_theta"):
        assert fragment in note[0], fragment
    assert "config inferred from tensor shapes" in run.stdout, run.stdout
    out = _out(run)
    prov = json.loads((out / "growkit.json").read_text())
    assert prov["source"]["config_inferred"]["fields"]["num_attention_heads"] == 4
    assert "rope_theta" in prov["source"]["config_inferred"]["defaulted"]
    assert prov["verification"]["config_inferred"] is True


def test_noise_snr_zero_db_is_accepted_and_stays_finite(srcs, tmp_path):
    """The bound is 0 dB inclusive: noise as large as the weights is still written, finite."""
    import growkit

    result = growkit.grow(srcs["llama"], tmp_path / "out", width="2x", noise_snr_db=0.0, quiet=True)
    tensors = load_file(result.out_dir / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


# --- memory: the address-space limit of `ulimit -v` -------------------------------------------------------------

@pytest.fixture(scope="module")
def vm_size() -> int:
    """This machine's address space in use once the CLI's modules are imported (the base of every limit below)."""
    code = ("import growkit.cli, growkit.pipeline\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmSize:')][0].split()[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120,
                          check=True)
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def _run_limited(limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), timeout=300,
                          preexec_fn=limit_address_space)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_tensor_that_cannot_fit_in_memory_is_refused_before_allocating(srcs, vm_size, tmp_path):
    """200x of a 32-wide GPT-2: c_fc becomes [6400, 25600], 655 MB in fp32; the limit leaves 256 MB."""
    out = tmp_path / "out"
    proc = _run_limited(vm_size + (256 << 20), "grow", srcs["gpt2"], "-o", out, "--width", "200x",
                        "-q")
    error_line(proc.returncode, proc.stderr, srcs["gpt2"], "transformer.h.0.mlp.c_fc.weight", "[6400, 25600]",
               "needs at least", "of memory", "is available")
    assert proc.returncode == 2
    assert_nothing_written(out)


def test_too_small_address_space_at_start_up_is_one_line(srcs, tmp_path):
    out = tmp_path / "out"
    proc = _run_limited(300 << 20, "grow", srcs["gpt2"], "-o", out, "--width", "2x", "-q")
    error_line(proc.returncode, proc.stderr, "out of memory", "ulimit -v")
    assert proc.returncode == 2
    assert_nothing_written(out)


REAL = Path("/root/.cache/growkit-real/smollm2-135m")


@pytest.mark.skipif(not (REAL / "model.safetensors").exists(), reason="needs the real SmolLM2-135M conversion")
def test_out_of_memory_while_opening_a_real_checkpoint_is_one_line(vm_size, tmp_path):
    """Its 538 MB file cannot be memory-mapped within 300 MB more than start-up needs: one line, exit 2."""
    out = tmp_path / "out"
    proc = _run_limited(vm_size + (300 << 20), "grow", REAL, "-o", out, "--width", "2x", "-q")
    error_line(proc.returncode, proc.stderr, "out of memory")
    assert proc.returncode == 2
    assert_nothing_written(out)


# --- training that diverges -------------------------------------------------------------------------------------

def _strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


def test_training_that_diverges_stops_in_one_line_and_keeps_its_finite_checkpoint(srcs, tmp_path):
    ckpt = _gpt2_with_tokenizer(tmp_path / "ckpt")
    data = tmp_path / "data.txt"
    data.write_text(srcs["calib"].read_text() * 4)
    out = tmp_path / "run"
    proc = subprocess.run(cli_command("train", ckpt, "--data", data, "-o", out, "--steps", "8", "--save-every", "1",
                                      "--lr", "1e8", "--batch-size", "2", "--seq-len", "32", "-q"),
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    line = error_line(proc.returncode, proc.stderr, out, "training diverged at step", "is nan", "lower --lr")
    assert proc.returncode == 2
    rows = [_strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    saved = sorted(out.glob("checkpoint-*"))
    assert saved and str(saved[-1]) in line
    for file in saved[-1].glob("*.safetensors"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(file).values())
    assert not (out / "model.safetensors").exists()


def test_train_seed_outside_numpys_range_is_refused(srcs, tmp_path):
    import growkit

    with pytest.raises(GrowkitError, match=r"--seed must be an integer from 0 to 4294967295"):
        growkit.train(srcs["gpt2"], srcs["calib"], tmp_path / "run", seed=2**32, steps=1)


# --- µP ---------------------------------------------------------------------------------------------------------

def test_mup_stays_off_for_a_shrunk_checkpoint(srcs, tmp_path):
    """A shrunk model's source is wider: as a µP base it would multiply learning rates (multipliers > 1)."""
    import growkit

    out = growkit.shrink(srcs["llama"], tmp_path / "shrunk", hidden=16, ffn=24, method="select", quiet=True).out_dir
    config = json.loads((out / "config.json").read_text())
    base, why = resolve_base_config(out, config, None, None)
    assert base is None and "shrunk" in why
    with pytest.raises(GrowkitError, match="shrunk from a wider model"):
        resolve_base_config(out, config, True, None)
    grown = growkit.grow(srcs["llama"], tmp_path / "grown", width="2x", quiet=True).out_dir
    base, _ = resolve_base_config(grown, json.loads((grown / "config.json").read_text()), None, None)
    assert base is not None and base["hidden_size"] == 32


@pytest.mark.parametrize("option,message", [(dict(seed=-1), "--seed must be"), (dict(max_shard_size="0"),
                                            "--max-shard-size"), (dict(dtype="fp8"), "--dtype: expected one of"),
                                            (dict(noise_snr_db=float("nan")), "--noise-snr-db must be")])
def test_arguments_are_checked_before_the_source_is_read(tmp_path, option, message):
    """A bad argument is refused before the source is opened (loading can be costly: a GGUF file is dequantized whole),
    so the message names the argument even when the source is unreadable too."""
    src = tmp_path / "broken.safetensors"
    src.write_bytes(b"not a safetensors file")
    with pytest.raises(GrowkitError, match=message):
        grow(src, tmp_path / "out", width="2x", **option)
    assert not (tmp_path / "out").exists()
