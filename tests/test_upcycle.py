"""Sparse upcycling: dense Llama / Mistral / Qwen2 / Qwen3 -> Mixtral / Qwen2-MoE / Qwen3-MoE.

Every exact case loads with transformers' AutoModelForCausalLM (no missing or unexpected keys) and computes the dense
model's logits to max |dlogits| <= 1e-5 x max |logit|; the cases the plan calls inexact say so and are measured.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli_util import assert_nothing_written, error_line, run_cli_batch, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

import growkit

from conftest import MODELS, randomize, save_tiny, tiny_config
from growkit.arch.moe import LAYOUTS, MoeFamily
from growkit.checkpoint.reader import load_checkpoint
from growkit.errors import GrowkitError
from growkit.pipeline import grow, grow_model
from growkit.train.blocks import load_blocks
from growkit.train.data import write_stdlib_corpus
from growkit.train.loop import evaluate
from growkit.train.moe import router_loss_setup
from growkit.upcycle import upcycle
from growkit.verify import compare, load_grown, model_from_checkpoint, random_tokens

TOL = 1e-5


def _gap(src: Path, out: Path) -> tuple[float, dict[str, list[str]], torch.nn.Module]:
    dense = model_from_checkpoint(load_checkpoint(src))
    moe, info = load_grown(out)
    c = compare(dense, moe, random_tokens(101, seed=1, length=32))
    return c["max_abs_dlogits"] / c["max_abs_logit"], info, moe


EXACT = [
    ("llama-gqa4", dict(experts=4, top_k=2)),
    ("llama-tied", dict(experts=4, top_k=2, granularity=2)),
    ("mistral", dict(experts=8, top_k=4, granularity=4)),
    ("qwen2", dict(experts=4, top_k=2)),
    ("qwen2", dict(experts=4, top_k=2, granularity=4, shared_experts=2)),
    ("qwen2", dict(experts=4, top_k=2, router="zero", norm_topk_prob=False)),
    ("qwen3", dict(experts=4, top_k=1)),
    ("qwen3-tied", dict(experts=3, top_k=2, router="zero")),
    ("llama-gqa4", dict(experts=4, top_k=4, router="zero", expert_noise=20.0)),
]


@pytest.mark.parametrize("name,options", EXACT, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}"
                                                      for n, o in EXACT])
def test_upcycle_is_exact_at_step_0(tmp_path: Path, name: str, options: dict) -> None:
    src = save_tiny(name, tmp_path / "dense")
    result = upcycle(src, tmp_path / "moe", quiet=True, **options)
    assert result.provenance["exact_at_step_0"], result.provenance["not_exact_because"]
    rel, info, moe = _gap(src, result.out_dir)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    assert rel <= TOL, rel
    target = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}[
        name.split("-")[0]]
    assert moe.config.model_type == target
    experts = moe.config.num_local_experts if target == "mixtral" else moe.config.num_experts
    assert (experts, moe.config.num_experts_per_tok) == (options["experts"], options["top_k"])


def test_output_uses_the_per_expert_layout(tmp_path: Path) -> None:
    """The published checkpoints' names (older transformers, vLLM and llama.cpp's converter read only these), the
    dense FFN's slices in each expert, and a random router whose rows repeat within each copy (virtual groups)."""
    src = save_tiny("llama-gqa4", tmp_path / "dense")
    out = upcycle(src, tmp_path / "moe", experts=4, top_k=2, granularity=2, quiet=True).out_dir
    with safe_open(src / "model.safetensors", "pt") as f:
        gate, down = f.get_tensor("model.layers.1.mlp.gate_proj.weight"), f.get_tensor("model.layers.1.mlp.down_proj.weight")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        p = "model.layers.1.block_sparse_moe."
        assert {f"{p}experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")} <= names
        assert not any(".mlp." in n for n in names)
        half = gate.shape[0] // 2
        assert torch.equal(f.get_tensor(f"{p}experts.3.w1.weight"), gate[half:])
        assert torch.equal(f.get_tensor(f"{p}experts.2.w2.weight"), 2 * down[:, :half])
        router = f.get_tensor(f"{p}gate.weight")
    assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
    assert not torch.equal(router[0], router[2])
    provenance = json.loads((out / "growkit.json").read_text())
    assert provenance["kind"] == "upcycle" and provenance["target"]["expert_ffn"] == half


def _routing(moe: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = moe(input_ids=tokens, output_router_logits=True)
    return torch.cat([logits.topk(moe.config.num_experts_per_tok, dim=-1).indices for logits in out.router_logits])


def test_router_inits_route_as_documented(tmp_path: Path) -> None:
    """random: tokens spread over the experts from step 0; zero: every token takes the same experts."""
    src = save_tiny("qwen3", tmp_path / "dense")
    tokens = random_tokens(101, seed=2, length=32)
    picked = {}
    for router in ("random", "zero"):
        out = upcycle(src, tmp_path / router, experts=8, top_k=2, router=router, quiet=True).out_dir
        moe, _ = load_grown(out)
        with torch.no_grad():
            picked[router] = _routing(moe, tokens)
    assert len(picked["random"].unique()) == 8
    assert len(picked["zero"].unique(dim=0)) == 1


def test_inexact_options_are_announced_and_measured(tmp_path: Path) -> None:
    """Unnormalised top-k with a random router, expert noise under top-2 routing and Drop-Upcycling change the
    function: the plan says so (growkit.json) and the change is real, not a rounding error."""
    src = save_tiny("qwen2", tmp_path / "dense")
    cases = {"unnormalised": dict(norm_topk_prob=False), "noise": dict(expert_noise=20.0),
             "reinit": dict(reinit_ratio=0.5)}
    for label, options in cases.items():
        result = upcycle(src, tmp_path / label, experts=4, top_k=2, quiet=True, **options)
        assert not result.provenance["exact_at_step_0"]
        assert result.provenance["not_exact_because"]
        rel, info, _ = _gap(src, result.out_dir)
        assert info == {"missing_keys": [], "unexpected_keys": []}
        assert rel > 100 * TOL, (label, rel)


def test_expert_rows_the_default_kernel_refuses_are_announced(tmp_path: Path) -> None:
    """Experts of 3 neurons (12 bytes a row in fp32): transformers' default grouped_mm kernel refuses them, which
    growkit says; loaded with the eager kernel the model is exact."""
    src = save_tiny("llama-gqa4", tmp_path / "dense")
    result = upcycle(src, tmp_path / "moe", experts=16, top_k=16, granularity=16, quiet=True)
    assert "grouped_mm" in result.provenance["notes"][0]
    dense = model_from_checkpoint(load_checkpoint(src))
    moe = AutoModelForCausalLM.from_pretrained(result.out_dir, experts_implementation="eager")
    c = compare(dense, moe, random_tokens(101, seed=1, length=32))
    assert c["max_abs_dlogits"] <= TOL * c["max_abs_logit"]
    with pytest.raises(RuntimeError, match="16 bytes"):
        grown, _ = load_grown(result.out_dir)
        compare(dense, grown, random_tokens(101, seed=1, length=32))


def test_expert_noise_cancels_over_copies(tmp_path: Path) -> None:
    """Each copy's down_proj gets noise, and the copies' noise sums to zero, slice by slice."""
    src = save_tiny("qwen3", tmp_path / "dense")
    out = upcycle(src, tmp_path / "moe", experts=6, top_k=2, granularity=2, expert_noise=10.0, quiet=True).out_dir
    with safe_open(src / "model.safetensors", "pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    half = down.shape[1] // 2
    with safe_open(out / "model.safetensors", "pt") as f:
        experts = [f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.weight") for e in range(6)]
    for piece in range(2):
        copies = experts[piece::2]
        dense = 2 * down[:, piece * half:(piece + 1) * half]
        assert all(not torch.allclose(c, dense) for c in copies)
        torch.testing.assert_close(sum(copies) / 3, dense, rtol=0, atol=1e-6)


def test_reinit_ratio_redraws_that_share_of_neurons(tmp_path: Path) -> None:
    src = save_tiny("llama-gqa4", tmp_path / "dense")
    out = upcycle(src, tmp_path / "moe", experts=4, top_k=2, reinit_ratio=0.25, quiet=True).out_dir
    with safe_open(src / "model.safetensors", "pt") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    with safe_open(out / "model.safetensors", "pt") as f:
        rows = [(f.get_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight") != up).any(dim=1)
                for e in range(4)]
    assert all(int(r.sum()) == round(0.25 * up.shape[0]) for r in rows)
    assert len({tuple(r.tolist()) for r in rows}) > 1  # a different subset per expert


BAD = [
    ("llama-gqa4", dict(experts=4, top_k=5), ["--top-k 5", "--experts 4"]),
    ("llama-gqa4", dict(experts=4, granularity=5), ["--granularity 5", "48"]),
    ("llama-gqa4", dict(experts=4, granularity=2, shared_experts=1), ["--shared-experts", "mixtral has no shared"]),
    ("llama-gqa4", dict(experts=4, granularity=2, top_k=3), ["--top-k 3", "whole copies"]),
    ("llama-gqa4", dict(experts=4, granularity=2, router="zero"), ["--router zero", "by index"]),
    ("llama-gqa4", dict(experts=4, to="qwen2_moe"), ["--to qwen2_moe", "mixtral"]),
    ("qwen2", dict(experts=3, granularity=2), ["--experts 3", "multiple"]),
    ("llama-gqa4", dict(experts=4, norm_topk_prob=False), ["mixtral always renormalises"]),
    ("llama-gqa4", dict(experts=1, top_k=1, expert_noise=10.0), ["--expert-noise", "two copies"]),
    ("gpt2", dict(experts=4), ["cannot upcycle a gpt2 model"]),
]


@pytest.mark.parametrize("name,options,fragments", BAD, ids=[f"{n}-{'-'.join(map(str, o.values()))}"
                                                             for n, o, _ in BAD])
def test_impossible_requests_are_refused_before_writing(tmp_path: Path, name: str, options: dict,
                                                        fragments: list[str]) -> None:
    src = save_tiny(name, tmp_path / "dense")
    out = tmp_path / "moe"
    with pytest.raises(GrowkitError) as info:
        upcycle(src, out, quiet=True, **options)
    message = str(info.value)
    assert message.startswith(str(src)), message
    for fragment in fragments:
        assert fragment in message, message
    assert_nothing_written(out)


def test_ffn_biases_are_refused(tmp_path: Path) -> None:
    """Experts have no biases in any target family: a dense FFN with them cannot be upcycled exactly."""
    config = tiny_config("llama-gqa4")
    config.mlp_bias = True
    src = tmp_path / "dense"
    randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(src)
    with pytest.raises(GrowkitError, match="the FFN has biases"):
        upcycle(src, tmp_path / "moe", experts=4, quiet=True)
    assert_nothing_written(tmp_path / "moe")


def test_cli_upcycles_and_refuses_in_one_line(tmp_path: Path) -> None:
    """The real CLI: exit 2 with one line and nothing written for a bad request or an occupied output; a good run
    prints what it wrote and, with --verify, transformers' own check."""
    llama = save_tiny("llama-gqa4", tmp_path / "llama")
    qwen2 = save_tiny("qwen2", tmp_path / "qwen2")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    before = snapshot(existing)
    o, good = tmp_path / "out", tmp_path / "good"
    runs = run_cli_batch([
        ["upcycle", llama, "-o", o, "--experts", "4", "--granularity", "2", "--top-k", "3"],
        ["upcycle", llama, "-o", existing, "--experts", "4"],
        ["upcycle", qwen2, "-o", good, "--experts", "4", "--granularity", "2", "--shared-experts", "1", "--verify"],
    ])
    error_line(runs[0].returncode, runs[0].stderr, llama, "--top-k 3", "whole copies")
    error_line(runs[1].returncode, runs[1].stderr, existing, "already exists")
    assert [r.returncode for r in runs[:2]] == [2, 2]
    assert_nothing_written(o)
    assert snapshot(existing) == before
    ok = runs[2]
    assert ok.returncode == 0, ok.stderr
    assert "qwen2_moe, 4 experts" in ok.stdout and "exact at step 0: yes" in ok.stdout
    assert "no missing or unexpected keys" in ok.stdout
    verification = json.loads((good / "growkit.json").read_text())["verification"]
    assert verification["max_abs_dlogits"] <= TOL * verification["max_abs_logit"]


# --- MoE checkpoints as sources -------------------------------------------------------------------------------

_COMMON = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)
MOE = {
    "mixtral": lambda: MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "qwen2_moe": lambda: Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=12,
                                        shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                        **_COMMON),
    # a shared expert that is not a whole number of experts stays as it is; raw top-k weights
    "qwen2_moe-odd": lambda: Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=12,
                                            shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                            norm_topk_prob=False, **_COMMON),
    "qwen3_moe-tied": lambda: Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=12, num_experts=4,
                                             num_experts_per_tok=2, head_dim=8, norm_topk_prob=True,
                                             tie_word_embeddings=True, **_COMMON),
}
GROWTHS = {"clone-2x": dict(width="2x"), "identity-depth": dict(layers="2x", depth_method="identity"),
           "net2net": dict(hidden=48, ffn=32, method="net2net"), "copy-pad": dict(width="2x", method="copy-pad"),
           "rc-sample": dict(width="2x", method="rc-sample")}


def _save_moe(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    randomize(AutoModelForCausalLM.from_config(MOE[name]())).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", MOE)
def test_moe_sources_grow_exactly(tmp_path: Path, name: str) -> None:
    """Mixtral / Qwen2-MoE / Qwen3-MoE as saved by transformers (the per-expert layout): clone 2x in width (hidden,
    heads and the ffn inside every expert, and the shared expert's blocks), identity depth and net2net at uneven
    ratios all compute the source's logits; both sides are loaded by transformers itself."""
    src = _save_moe(name, tmp_path / "src")
    source, _ = load_grown(src)
    tokens = random_tokens(101, seed=3, length=32)
    for label, options in GROWTHS.items():
        result = grow(src, tmp_path / label, quiet=True, **options)
        grown, info = load_grown(result.out_dir)
        assert info == {"missing_keys": [], "unexpected_keys": []}, label
        c = compare(source, grown, tokens)
        assert c["max_abs_dlogits"] <= TOL * c["max_abs_logit"], (label, c)
        sizes = {k: new for k, _, new in result.plan.rows()}
        assert sizes["experts"] == 4
        if label == "clone-2x":
            assert grown.config.hidden_size == 64 and sizes["ffn"] == 2 * source.config.to_dict().get(
                "moe_intermediate_size", source.config.intermediate_size)
        with safe_open(result.out_dir / "model.safetensors", "pt") as f:
            assert any(".experts.3." in n for n in f.keys())  # written in the per-expert layout again


def test_moe_verify_reads_the_per_expert_layout(tmp_path: Path) -> None:
    """`grow --verify` builds the source model from per-expert tensors (fused the way transformers 5 holds them)."""
    src = _save_moe("qwen2_moe", tmp_path / "src")
    v = grow(src, tmp_path / "out", width="2x", quiet=True, verify=True).provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    assert v["max_abs_dlogits"] <= TOL * v["max_abs_logit"]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe-tied"])
def test_select_shrinks_moe_sources_in_width_and_depth(tmp_path: Path, name: str) -> None:
    """`shrink --method select` to half the width (hidden, heads, the ffn inside every expert) and one layer: the
    output loads with no missing or unexpected keys and `--verify` runs it. Its experts have 6 neurons, 24 bytes a
    row in fp32 in the Qwen MoEs, which transformers' default expert kernel refuses: growkit says so, and verification
    runs the eager kernel."""
    src = _save_moe(name, tmp_path / "src")
    result = growkit.shrink(src, tmp_path / "out", width="0.5x", layers=1, method="select", verify=True, quiet=True)
    v = result.provenance["verification"]
    assert (v["missing_keys"], v["unexpected_keys"], v["experts_implementation"]) == ([], [], "eager")
    assert all(math.isfinite(v[k]) for k in ("max_abs_dlogits", "source_loss", "grown_loss"))
    refused = name != "mixtral"  # Mixtral's experts keep 12 neurons, 48 bytes a row
    assert ("grouped_mm" in " ".join(result.provenance.get("notes", []))) == refused
    source, shrunk = MOE[name]().to_dict(), json.loads((result.out_dir / "config.json").read_text())
    ffn_key = LAYOUTS[source["model_type"]].ffn_key
    assert (shrunk["hidden_size"], shrunk[ffn_key], shrunk["num_attention_heads"], shrunk["num_hidden_layers"]) == (
        source["hidden_size"] // 2, source[ffn_key] // 2, source["num_attention_heads"] // 2, 1)
    assert result.provenance["sizes"]["experts"] == [4, 4] and MoeFamily.experts(shrunk) == 4


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_inspect_measures_each_expert_and_the_router_load(tmp_path: Path, name: str) -> None:
    """`inspect` on a MoE checkpoint: statistics for every stored tensor (experts, routers, shared expert), one neuron
    measure per expert (its own three projections, not the layer's experts pooled) and, from the activation pass,
    each layer's share of the top-k assignments per expert, which matches transformers' own routing."""
    src = _save_moe(name, tmp_path / "src")
    report = growkit.inspect(src, permutations=9, plots=False, calibration_tokens=256)
    with safe_open(src / "model.safetensors", "pt") as f:
        assert {t.name for t in report.tensors} == set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(src)
    config, block = model.config, LAYOUTS[name].block
    experts = config.num_local_experts if name == "mixtral" else config.num_experts
    hidden = config.hidden_size
    expert_ffn = config.intermediate_size if name == "mixtral" else config.moe_intermediate_size
    ffn_axes = {a.axis: a for a in report.axes if a.kind.startswith("ffn")}
    assert set(ffn_axes) == {f"ffn[{block.format(layer)[len('model.layers.0.'):]}experts.{e}]@{layer}"
                             for layer in range(config.num_hidden_layers) for e in range(experts)}
    assert all((a.neurons, a.tensors, a.feature_dim) == (expert_ffn, 3, 3 * hidden) for a in ffn_axes.values())
    routing = report.routing
    assert routing is not None and routing.top_k == config.num_experts_per_tok
    fractions = torch.tensor(routing.fractions)
    assert fractions.shape == (config.num_hidden_layers, experts)
    assert torch.allclose(fractions.sum(1), torch.ones(config.num_hidden_layers, dtype=fractions.dtype))
    # inspect's random tokens: 256 in rows of max_position_embeddings (64), seed 0
    tokens = torch.randint(config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=tokens, output_router_logits=True).router_logits
    picks = [torch.bincount(x.topk(routing.top_k, -1).indices.flatten(), minlength=experts) for x in logits]
    assert torch.equal(fractions, torch.stack(picks).double() / (256 * routing.top_k))


def test_inspect_cli_prints_and_writes_the_router_load(tmp_path: Path) -> None:
    """`growkit inspect` on a MoE checkpoint prints the router-load table and writes it to report.json."""
    src = _save_moe("qwen3_moe-tied", tmp_path / "src")
    (run,) = run_cli_batch([["inspect", src, "--out", tmp_path / "report", "--no-plots", "--permutations", "9",
                             "--calibration-tokens", "128"]], width=1)
    assert run.returncode == 0, run.stderr
    routing = json.loads((tmp_path / "report" / "report.json").read_text())["routing"]
    assert "router load on random tokens" in run.stdout and len(routing["fractions"]) == 2
    for row in routing["fractions"]:
        assert abs(sum(row) - 1) < 1e-9 and " │ ".join(f"{f:.3f}" for f in row) in run.stdout


# --- training an upcycled model ---------------------------------------------------------------------------------

def test_train_upcycled_model_with_load_balancing(tmp_path: Path) -> None:
    """`growkit train` on an upcycled model: the load-balancing loss is on (the router, which identical experts give
    no language-model gradient, moves), every step logs each expert's share of routed tokens, evaluation reports the
    language-model loss alone (the step-0 MoE evaluates exactly as the dense model), and the result loads."""
    dense = MODELS / "tiny-llama"
    moe_dir = upcycle(dense, tmp_path / "moe", experts=4, top_k=2, quiet=True).out_dir
    text = write_stdlib_corpus(tmp_path / "train.txt", "train", max_bytes=60_000)
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    blocks = load_blocks([text], tokenizer, 64, tmp_path / "cache")
    dense_loss = evaluate(AutoModelForCausalLM.from_pretrained(dense), blocks, max_blocks=8)
    moe = AutoModelForCausalLM.from_pretrained(moe_dir)
    assert router_loss_setup(moe, 0.02) is not None
    moe.config.output_router_logits = True  # evaluation leaves the aux loss out even so
    assert abs(evaluate(moe, blocks, max_blocks=8) - dense_loss) <= TOL * dense_loss

    out = tmp_path / "run"
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    result = growkit.train(moe_dir, text, out, steps=5, lr=1e-3, warmup=1, batch_size=4, seq_len=64, quiet=True,
                           router_aux_loss_coef=0.02, report_to=report_to)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert len(row["expert_fractions"]) == 4 and abs(sum(row["expert_fractions"]) - 1) < 1e-4
        assert row["aux_loss"] is not None and row["aux_loss"] > 0
    if report_to == "tensorboard":  # the tracker gets the same MoE figures as metrics.jsonl
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "runs" / "growkit"), size_guidance={"scalars": 0}).Reload()
        want = {"train/aux_loss": {r["step"]: r["aux_loss"] for r in rows},
                **{f"train/expert_fraction/{e}": {r["step"]: r["expert_fractions"][e] for r in rows} for e in range(4)}}
        for tag, values in want.items():
            assert {e.step: e.value for e in events.Scalars(tag)} == pytest.approx(values, rel=1e-6), tag
    trained = AutoModelForCausalLM.from_pretrained(out)
    with safe_open(moe_dir / "model.safetensors", "pt") as f:
        router = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert not torch.equal(trained.model.layers[0].mlp.gate.weight.detach(), router)
    assert result.model.config.router_aux_loss_coef == 0.02


def test_router_loss_coefficient_needs_a_moe_model(tmp_path: Path) -> None:
    with pytest.raises(GrowkitError, match="not a mixture of experts"):
        router_loss_setup(AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama"), 0.01)


def test_moe_in_the_fused_layout_grows_exactly(tmp_path: Path) -> None:
    """transformers 5's in-memory layout (3-D expert tensors) as a source: a file saved from a live model's state
    dict, and `grow_model` of the live model; both grow exactly and the file's output is per-expert again."""
    src = _save_moe("mixtral", tmp_path / "src")
    source, _ = load_grown(src)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(src / "config.json", fused / "config.json")
    tokens = random_tokens(101, seed=4, length=32)
    out = grow(fused, tmp_path / "out", width="2x", quiet=True).out_dir
    grown, info = load_grown(out)
    assert info == {"missing_keys": [], "unexpected_keys": []}
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    in_memory = grow_model(source, width="2x")
    for model in (grown, in_memory):
        c = compare(source, model, tokens)
        assert c["max_abs_dlogits"] <= TOL * c["max_abs_logit"], c


@pytest.mark.parametrize("name", MOE)
def test_more_experts_by_copying_is_exact(tmp_path: Path, name: str) -> None:
    """E -> m E experts (each copied m times with its router row) and top-k -> m K (the default) is exact, also with
    expert noise (all copies of an expert are taken together, with equal weights); keeping top-k is not, and says so."""
    src = _save_moe(name, tmp_path / "src")
    source, _ = load_grown(src)
    tokens = random_tokens(101, seed=5, length=32)
    for label, options in {"x2": dict(experts=8), "x3-noise": dict(experts=12, expert_noise=10.0),
                           "same-top-k": dict(experts=8, top_k=2)}.items():
        result = upcycle(src, tmp_path / label, quiet=True, **options)
        grown, info = load_grown(result.out_dir)
        assert info == {"missing_keys": [], "unexpected_keys": []}
        assert grown.config.num_experts_per_tok == options.get("top_k", 2 * options["experts"] // 4)
        c = compare(source, grown, tokens)
        exact = c["max_abs_dlogits"] <= TOL * c["max_abs_logit"]
        assert exact == result.provenance["exact_at_step_0"] == (label != "same-top-k"), (label, c)
    layout = LAYOUTS[MOE[name]().model_type]
    with safe_open(tmp_path / "x3-noise" / "model.safetensors", "pt") as f:
        down = [f.get_tensor(layout.expert(e, "down_proj").format(1)) for e in (1, 5, 9)]  # the copies of expert 1
    with safe_open(src / "model.safetensors", "pt") as f:
        original = f.get_tensor(layout.expert(1, "down_proj").format(1))
    assert not torch.equal(down[0], down[1])
    torch.testing.assert_close(sum(down) / 3, original, rtol=0, atol=1e-6)


def test_more_experts_refuses_what_it_cannot_copy(tmp_path: Path) -> None:
    dense_layers = tmp_path / "dense-layers"
    config = MOE["qwen2_moe"]()
    config.mlp_only_layers = [1]
    AutoModelForCausalLM.from_config(config).save_pretrained(dense_layers)
    with pytest.raises(GrowkitError, match="some layers are dense"):
        upcycle(dense_layers, tmp_path / "out", experts=8, quiet=True)
    src = _save_moe("mixtral", tmp_path / "src")
    for options, fragment in ((dict(experts=6), "multiple of 4"), (dict(experts=8, granularity=2), "dense sources"),
                              (dict(experts=8, to="qwen2_moe"), "stays mixtral")):
        with pytest.raises(GrowkitError, match=fragment):
            upcycle(src, tmp_path / "out", quiet=True, **options)
        assert_nothing_written(tmp_path / "out")
