"""Shrinking: subclone (importance ranking, block removal, rescaling), select (evenly strided), errors, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T

from cli_util import run_cli_batch
from growkit import grow, shrink
from growkit.checkpoint.reader import StateDictCheckpoint, load_checkpoint
from growkit.errors import GrowkitError
from growkit.pipeline import plan_growth
from growkit.train.data import stdlib_text

REPO = Path(__file__).resolve().parent.parent
TINY_LLAMA = REPO / "models" / "tiny-llama"
TINY_GPT2 = REPO / "models" / "tiny-gpt2"


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """Real text from the stdlib *train* split (the validation split is never used for calibration)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_text("train", max_bytes=20_000), encoding="utf-8")
    return path


def _loaded_cleanly(result) -> dict:
    v = result.provenance["verification"]
    assert v["missing_keys"] == [] and v["unexpected_keys"] == []
    return v


@pytest.mark.parametrize("method", ["subclone", "select"])
@pytest.mark.parametrize("family,request_,expect", [
    ("gpt2", dict(width="0.5x", layers=1), dict(n_embd=16, n_head=2, n_layer=1, n_inner=None)),
    ("gpt2-untied", dict(width="0.5x"), dict(n_embd=16, n_head=2, n_layer=2)),
    ("llama-tied", dict(width="0.5x", layers=1),
     dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)),
    ("llama-gqa4", dict(hidden=16, ffn=24, heads=2, layers=1),  # kv stays 1: the query group shrinks 4 -> 2
     dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)),
    ("qwen2", dict(width="0.5x"), dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)),
])
def test_shrunk_model_loads_without_missing_or_unexpected_keys(tiny, tmp_path, method, family, request_, expect):
    result = shrink(tiny(family), tmp_path / "out", method=method, verify=True, quiet=True, **request_)
    v = _loaded_cleanly(result)
    assert torch.isfinite(torch.tensor(v["grown_loss"]))
    config = T.AutoConfig.from_pretrained(result.out_dir)
    for key, value in expect.items():
        assert getattr(config, key) == value, key
    assert result.provenance["kind"] == "shrink" and result.provenance["operator"] == method
    assert result.provenance["parameters"][1] < result.provenance["parameters"][0]


@pytest.mark.parametrize("src", [TINY_LLAMA, TINY_GPT2])
def test_subclone_with_calibration_beats_select_on_held_out_text(tmp_path, calib, src):
    """Bundled trained models, 0.5x width: activation-ranked subclone keeps more of the model than a strided pick."""
    tok = T.AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(stdlib_text("val", max_bytes=12_000))["input_ids"][: 8 * 128]).view(8, 128)
    losses = {}
    for method, extra in (("subclone", dict(calibration=[calib])), ("select", {})):
        out = shrink(src, tmp_path / method, width="0.5x", method=method, quiet=True, **extra).out_dir
        model = T.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            losses[method] = float(model(input_ids=ids, labels=ids).loss)
    assert out.joinpath("tokenizer.json").is_file()
    assert losses["subclone"] < losses["select"] - 0.05, losses  # measured: 5.10 vs 5.42 (llama), 6.31 vs 6.41 (gpt2)


def _planted_llama() -> StateDictCheckpoint:
    """tiny-llama with planted winners: FFN neuron 5 and kv head 1 in layer 1 dominate; layer 0 does nothing."""
    model = T.AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.layers.1.mlp.up_proj.weight"][5] *= 8
    sd["model.layers.1.mlp.down_proj.weight"][:, 5] *= 8
    sd["model.layers.1.self_attn.v_proj.weight"][16:32] *= 6  # kv head 1 (head_dim 16)
    sd["model.layers.1.self_attn.o_proj.weight"][:, 32:64] *= 6  # its query heads 2 and 3
    sd["model.layers.0.self_attn.o_proj.weight"].zero_()  # block 0 leaves the residual stream unchanged
    sd["model.layers.0.mlp.down_proj.weight"].zero_()
    return StateDictCheckpoint(sd, model.config.to_dict())


def test_source_model_is_filled_from_the_checkpoint_or_refused():
    """Models for importance and for rescale candidates are made without random init and filled tensor by tensor:
    every weight must come from the checkpoint (the logits equal transformers' own load), and a checkpoint that
    lacks a weight is refused instead of leaving uninitialised memory in the model."""
    from growkit.verify import model_from_checkpoint

    model = T.AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval()
    state, config = model.state_dict(), model.config.to_dict()
    ids = torch.arange(32).view(1, 32)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(StateDictCheckpoint(state, config))(input_ids=ids).logits,
                           model(input_ids=ids).logits)
    partial = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(GrowkitError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        model_from_checkpoint(StateDictCheckpoint(partial, config))


@pytest.mark.parametrize("importance", ["activations", "weights"])
def test_importance_ranking_picks_planted_neurons_heads_and_blocks(calib, importance):
    options = dict(calibration=[str(calib)], tokenizer=str(TINY_LLAMA)) if importance == "activations" else {}
    growth = plan_growth(_planted_llama(), width="0.5x", layers=1, method="subclone", direction="shrink",
                         depth_method=None, operator_options=dict(importance=importance, **options))
    maps = growth.maps
    assert maps.layer_src == [1]  # the block that changes nothing was removed
    assert 5 in maps.per_layer[("ffn", 0)].src.tolist()
    assert maps.per_layer[("kv_heads", 0)].src.tolist() == [1]  # the whole GQA group of kv head 1
    assert maps.per_layer[("qgroup", 0)].src.tolist() == [0, 1]
    select = plan_growth(_planted_llama(), width="0.5x", layers=1, method="select", direction="shrink",
                         depth_method=None).maps
    assert 5 not in select.per_layer[("ffn", 0)].src.tolist() and select.per_layer[("kv_heads", 0)].src.tolist() == [0]


def test_planted_stream_coordinate_is_kept(calib):
    model = T.AutoModelForCausalLM.from_pretrained(TINY_GPT2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["transformer.wte.weight"][:, 33] *= 10
    del sd["lm_head.weight"]  # tied: a stale copy would overwrite the planted embedding when loaded
    ckpt = StateDictCheckpoint(sd, model.config.to_dict())
    for options in (dict(importance="activations", calibration=[str(calib)], tokenizer=str(TINY_GPT2)),
                    dict(importance="weights")):
        growth = plan_growth(ckpt, width="0.5x", method="subclone", direction="shrink", depth_method=None,
                             operator_options=options)
        assert 33 in growth.maps.hidden.src.tolist(), options["importance"]


def test_select_keeps_evenly_strided_whole_heads(tiny, tmp_path):
    src = tiny("gpt2")
    out = shrink(src, tmp_path / "out", width="0.5x", method="select", quiet=True).out_dir
    a = load_checkpoint(src)
    b = load_checkpoint(out)
    hid = torch.arange(0, 32, 2)  # hidden 32 -> 16: every other coordinate
    heads = torch.tensor([0, 2])  # 4 heads -> 2, head_dim 8: heads 0 and 2, all 8 of their columns
    cols = torch.cat([s * 32 + h * 8 + torch.arange(8) for s in range(3) for h in heads])  # q, k, v sections
    w = a.get("transformer.h.0.attn.c_attn.weight")
    assert torch.equal(b.get("transformer.h.0.attn.c_attn.weight"), w[hid][:, cols])
    ffn = torch.arange(0, 128, 2)
    assert torch.equal(b.get("transformer.h.1.mlp.c_proj.weight"), a.get("transformer.h.1.mlp.c_proj.weight")[ffn][:, hid])

    src = tiny("llama-tied")  # 4 query heads in 2 kv groups -> 2 query heads in 1 group: kv head 0 with both queries
    out = shrink(src, tmp_path / "llama", width="0.5x", method="select", quiet=True).out_dir
    a, b = load_checkpoint(src), load_checkpoint(out)
    q = a.get("model.layers.0.self_attn.q_proj.weight")  # [4 heads x 8, 32]
    assert torch.equal(b.get("model.layers.0.self_attn.q_proj.weight"), q[:16][:, torch.arange(0, 32, 2)])


def test_select_removes_evenly_strided_layers(tiny, tmp_path):
    result = shrink(tiny("llama-mha"), tmp_path / "out", layers=1, method="select", quiet=True)
    assert result.provenance["layer_map"] == [0]


def test_rescale_norm_restores_the_normalised_stream_scale(tmp_path, calib):
    """Dropping half the stream coordinates shrinks what RMSNorm outputs on the kept ones; the gain correction
    brings the first norm's output back to the source's scale (measured on held-out text)."""
    tok = T.AutoTokenizer.from_pretrained(TINY_LLAMA)
    ids = torch.tensor(tok(stdlib_text("val", max_bytes=6_000))["input_ids"][: 4 * 64]).view(4, 64)
    source = T.AutoModelForCausalLM.from_pretrained(TINY_LLAMA).eval()
    ratios = {}
    for rescale in ("none", "norm"):
        options = dict(importance="activations", calibration=[str(calib)], tokenizer=str(TINY_LLAMA), rescale=rescale)
        growth = plan_growth(load_checkpoint(TINY_LLAMA), hidden=32, method="subclone", direction="shrink",
                             depth_method=None, operator_options=options)
        out = shrink(TINY_LLAMA, tmp_path / rescale, hidden=32, calibration=[calib], rescale=rescale, quiet=True)
        model = T.AutoModelForCausalLM.from_pretrained(out.out_dir).eval()
        kept = growth.maps.hidden.src
        got = {}
        for name, m in (("src", source), ("new", model)):
            norm = m.model.layers[0].input_layernorm
            h = norm.register_forward_hook(lambda mod, i, o, name=name: got.__setitem__(name, o))
            with torch.no_grad():
                m(input_ids=ids)
            h.remove()
        ratios[rescale] = float(got["new"].pow(2).mean().sqrt() / got["src"][..., kept].pow(2).mean().sqrt())
    assert abs(ratios["norm"] - 1) < 0.01 and abs(ratios["norm"] - 1) < abs(ratios["none"] - 1) / 3, ratios


def _calibration_ids(calib: Path, tokenizer_dir: Path) -> list[int]:
    """The calibration file tokenized independently of growkit: its ids, then EOS."""
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok(calib.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _loss(directory: Path, ids: torch.Tensor) -> float:
    model = T.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("src", [TINY_LLAMA, TINY_GPT2])
def test_rescale_auto_keeps_the_mode_with_the_lowest_held_out_calibration_loss(tmp_path, calib, src, capfd):
    """Auto ranks on the first 2048 calibration tokens and scores every candidate on the next 1024; each fixed
    mode, written to disk by `shrink` and loaded with transformers, has the loss auto recorded for it on those
    tokens, and auto's output is exactly the fixed mode with the lowest one."""
    from growkit.operators.shrink import RESCALE_CANDIDATES

    common = dict(width="0.5x", calibration=[calib], calibration_tokens=2048, quiet=True)
    auto = shrink(src, tmp_path / "auto", operator_options=dict(heldout_tokens=1024), **common)
    options = auto.provenance["options"]
    assert options["rescale"] == "auto" and options["rescale_heldout_tokens"] == 1024
    assert f"subclone rescale auto: {options['rescale_chosen']}" in capfd.readouterr().err
    ids = torch.tensor(_calibration_ids(calib, src)[2048: 2048 + 1024]).view(4, 256)  # positions 256
    losses = {mode: _loss(shrink(src, tmp_path / mode.replace(":", "-"), rescale=mode, **common).out_dir, ids)
              for mode in RESCALE_CANDIDATES}
    assert options["rescale_losses"] == pytest.approx(losses, abs=1e-4)
    assert options["rescale_chosen"] == min(losses, key=losses.__getitem__)
    assert max(losses.values()) - min(losses.values()) > 0.05, losses  # the choice matters
    chosen = load_checkpoint(tmp_path / options["rescale_chosen"].replace(":", "-"))
    out = load_checkpoint(auto.out_dir)
    assert all(torch.equal(out.get(n), chosen.get(n)) for n in chosen.names())
    card = (auto.out_dir / "README.md").read_text()
    assert f"rescale_chosen: {options['rescale_chosen']}" in card and "- rescale_losses:" in card
    assert all(f"  - `{m}`: {v}" in card for m, v in options["rescale_losses"].items())  # one line per candidate
    fixed = json.loads((tmp_path / "fanin" / "growkit.json").read_text())["options"]
    assert fixed["rescale"] == "fanin" and "rescale_chosen" not in fixed  # a fixed mode records only itself


def test_rescale_auto_holds_out_the_last_quarter_of_short_text(tmp_path, calib, capfd):
    n = len(_calibration_ids(calib, TINY_GPT2))  # fewer than 8192 + 4096, and a quarter of it fewer than 4096
    result = shrink(TINY_GPT2, tmp_path / "out", width="0.5x", calibration=[calib], quiet=True,
                    operator_options=dict(heldout_tokens=4096))
    blocks = (n // 4) // 256 * 256  # whole blocks of 256 tokens
    assert result.provenance["options"]["rescale_heldout_tokens"] == blocks
    assert f"ranks on the first {n - n // 4} and measures the modes on {blocks} of the last {n // 4}" in \
        capfd.readouterr().err


def test_rescale_defaults_and_depth_only_shrink(tiny, tmp_path, calib):
    """Without calibration text the default stays fanin; removing blocks only leaves nothing to rescale; a growth
    records no rescale."""
    assert shrink(tiny("gpt2"), tmp_path / "w", width="0.5x", quiet=True).provenance["options"]["rescale"] == "fanin"
    options = shrink(TINY_LLAMA, tmp_path / "d", layers=1, calibration=[calib], quiet=True).provenance["options"]
    assert (options["rescale"], options["rescale_chosen"]) == ("auto", "none") and "rescale_losses" not in options
    grown = grow(tiny("gpt2"), tmp_path / "g", width="2x", method="subclone", quiet=True)  # rescale is shrink-only
    assert not any(k.startswith("rescale") for k in grown.provenance["options"])


def test_subclone_grows_by_ranked_duplication(tiny, tmp_path):
    # 2x: every neuron exactly twice, so the function is preserved exactly, like clone
    result = grow(tiny("llama-tied"), tmp_path / "x2", width="2x", method="subclone", verify=True, quiet=True)
    assert _loaded_cleanly(result)["max_abs_dlogits"] < 1e-5
    # non-integer: the extra neurons are the top-ranked ones
    growth = plan_growth(load_checkpoint(tiny("gpt2")), hidden=48, heads=6, ffn=192, method="subclone")
    ffn_map = growth.maps.per_layer[("ffn", 0)]
    scores = growth.operator.scores.ffn[0]
    assert ffn_map.src[:128].tolist() == list(range(128))
    assert set(ffn_map.src[128:].tolist()) == set(torch.topk(scores, 64).indices.tolist())
    assert float(ffn_map.reader_scale()[ffn_map.src == ffn_map.src[128]].sum()) == pytest.approx(1.0)
    result = grow(tiny("gpt2"), tmp_path / "x15", hidden=48, heads=6, ffn=192, method="subclone", verify=True,
                  quiet=True)
    assert abs(_loaded_cleanly(result)["dloss"]) < 0.5


@pytest.mark.parametrize("family,request_,message", [
    ("gpt2", dict(hidden=64, heads=8), "would grow from 32 to 64; use `growkit grow`"),
    ("llama-mha", dict(layers=3), "layers would grow from 2 to 3"),
    ("llama-tied", dict(heads=3), "heads 3 must be a multiple of kv heads 2"),
    ("llama-gqa4", dict(width="0.5x"), "gives kv_heads 0.5, not a whole number"),
    ("gpt2", dict(hidden=16), "GPT2Config reads these sizes as head_dim 4 (not 8); nearest sizes that pass: "
                              "`--heads 2`"),
    ("gpt2", dict(), "nothing to shrink"),
    ("gpt2", dict(width="0.5x", method="clone"), "--method clone cannot shrink a model"),
    ("gpt2", dict(width="0.5x", method="select", calibration=["x.txt"]), "--method select does not use --calibration (only subclone does)"),
    ("gpt2", dict(width="0.5x", calibration=["/nonexistent/calib.txt"]), "calibration file not found"),
    ("gpt2", dict(width="0.5x", rescale="both"), "rescale must be one of auto, none, norm, fanin, fanin:SITES"),
    ("gpt2", dict(width="0.5x", rescale="fanin:ffn+heads"), "subset of stream, ffn, attn), got 'fanin:ffn+heads'"),
    ("gpt2", dict(width="0.5x", rescale="auto"), "rescale auto picks the mode by its loss on held-out calibration"),
])
def test_bad_requests_fail_clearly(tiny, tmp_path, family, request_, message):
    with pytest.raises(GrowkitError, match=re.escape(message)):
        shrink(tiny(family), tmp_path / "out", quiet=True, **request_)
    assert not (tmp_path / "out").exists()


def test_calibration_without_a_tokenizer_fails_clearly(tiny, tmp_path, calib):
    with pytest.raises(GrowkitError, match="has no tokenizer files"):
        shrink(tiny("gpt2"), tmp_path / "out", width="0.5x", calibration=[calib], quiet=True)


def test_cli_shrink_default_output_and_one_line_error(tmp_path, calib):
    import shutil

    src = tmp_path / "tiny-llama"
    shutil.copytree(TINY_LLAMA, src)
    # Two processes of one batch (one import of the CLI, each run its own process and exit status).
    done, bad = run_cli_batch([["shrink", src, "--width", "0.5x", "--layers", "1", "--calibration", calib, "-q"],
                               ["shrink", src, "--width", "2x", "-o", tmp_path / "bad"]], width=2)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "tiny-llama-shrunk"
    cfg = T.AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 1)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {src}: hidden would grow from 64 to 128; use `growkit grow`"]


@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_rc_sample_shrinks_through_the_same_command(tiny, tmp_path, family):
    """`growkit shrink --method rc-sample` (the measure helper's operator): loads cleanly, fewer layers included
    (operators that do not rank blocks keep evenly strided layers)."""
    result = shrink(tiny(family), tmp_path / "out", width="0.5x", layers=1, method="rc-sample", verify=True, quiet=True)
    _loaded_cleanly(result)
    assert result.provenance["operator"] == "rc-sample" and result.provenance["layer_map"] == [0]
    with pytest.raises(GrowkitError, match=re.escape("--method rc-sample does not use --calibration")):
        shrink(tiny(family), tmp_path / "bad", width="0.5x", method="rc-sample", calibration=["x.txt"], quiet=True)
