"""Growth inside training: the optimizer state follows the weights through the axis maps (DESIGN.md section 2).

The property: a noiseless clone grown with its AdamW state continues the small model's trajectory, step for step,
on the same batches; with a fresh optimizer it does not.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from growkit.errors import GrowkitError
from growkit.train.grad_clip import NORM_WEIGHT, clip_grown_grad_norm_
from growkit.train.grow_state import grow_training_state
from conftest import randomize, tiny_config

LR, WD = 3e-3, 0.1
BEFORE, AFTER = 5, 20


def _small(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(T.AutoModelForCausalLM.from_config(tiny_config(family))).train()


def _batches(n: int, vocab: int = 101) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(vocab, (4, 16), generator=gen) for _ in range(n)]


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 8)


def _adamw(model: torch.nn.Module) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _warmup)


def _step(model, opt, sched, x, clip=None) -> float:
    """One AdamW step; `clip(model, opt)` clips the gradients first."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    if clip is not None:
        clip(model, opt)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _trained_small(family: str, clip=None):
    """The small model after BEFORE steps, with its optimizer and scheduler."""
    model = _small(family)
    opt, sched = _adamw(model)
    for x in _batches(BEFORE):
        _step(model, opt, sched, x, clip)
    return model, opt, sched


def _worst_departure(family: str, carry: bool, clip=None, grown_clip=None) -> float:
    """Largest relative per-step loss gap between the small model and its clone over the AFTER steps after growth;
    `clip` clips the small model's gradients, `grown_clip` (default `clip`) the grown model's."""
    grown_clip = grown_clip or clip
    model, opt, sched = _trained_small(family, clip)
    big_model = T.AutoModelForCausalLM.from_config(model.config)
    big_model.load_state_dict(model.state_dict())
    big_opt, big_sched = _adamw(big_model)
    big_opt.load_state_dict(opt.state_dict())
    big_sched.load_state_dict(sched.state_dict())
    grown = grow_training_state(big_model, big_opt, big_sched, width="2x")
    if carry:
        g_model, g_opt, g_sched = grown.model, grown.optimizer, grown.scheduler
    else:  # today's path: the grown weights with a new AdamW, the schedule continued
        g_model = grown.model
        g_opt = torch.optim.AdamW(g_model.parameters(), lr=LR, weight_decay=WD)
        g_sched = torch.optim.lr_scheduler.LambdaLR(g_opt, lambda s: _warmup(s + BEFORE))
    worst = 0.0
    for x in _batches(BEFORE + AFTER)[BEFORE:]:
        small_loss, grown_loss = _step(model, opt, sched, x, clip), _step(g_model, g_opt, g_sched, x, grown_clip)
        worst = max(worst, abs(grown_loss - small_loss) / abs(small_loss))
    return worst


FAMILIES = ["gpt2", "gpt2-untied", "llama-gqa4", "llama-tied"]  # llama-gqa4: 4 q / 1 kv untied; llama-tied: 4 / 2


@pytest.mark.parametrize("family", FAMILIES)
def test_clone_with_carried_state_continues_the_small_trajectory(family):
    assert _worst_departure(family, carry=True) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_clone_with_a_fresh_optimizer_departs(family):
    # What the carried state buys: today's path (fresh AdamW) leaves the small model's trajectory at once.
    assert _worst_departure(family, carry=False) > 1e-3


MAX_NORM = 0.25  # below every gradient norm of these runs (checked below), so every step is clipped


def _clip_raw(model, opt) -> None:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert norm > MAX_NORM  # the clip is active: the test compares clipped steps


def _clip_grown(model, opt) -> None:
    assert clip_grown_grad_norm_(opt, MAX_NORM) > MAX_NORM


@pytest.mark.parametrize("family", FAMILIES)
def test_clipping_after_growth_in_the_small_models_units_continues_the_trajectory(family):
    assert _worst_departure(family, carry=True, clip=_clip_raw, grown_clip=_clip_grown) <= 1e-5


def test_clipping_continues_across_two_growths():
    # The second growth multiplies the first one's factors on: a clone of a clone still clips like the small model.
    model, opt, sched = _trained_small("llama-gqa4", _clip_raw)
    grown = grow_training_state(model, opt, sched, width="2x")
    small = _trained_small("llama-gqa4", _clip_raw)
    worst = 0.0
    for i, x in enumerate(_batches(BEFORE + AFTER)[BEFORE:]):
        if i == 5:
            grown = grow_training_state(grown.model, grown.optimizer, grown.scheduler, width="2x")
        small_loss = _step(*small, x, _clip_raw)
        grown_loss = _step(grown.model, grown.optimizer, grown.scheduler, x, _clip_grown)
        worst = max(worst, abs(grown_loss - small_loss) / small_loss)
    assert grown.model.config.hidden_size == 4 * model.config.hidden_size and worst <= 1e-5


def test_clipping_the_grown_models_raw_norm_departs():
    # Why the clip weighs the gradients: the raw norm of a clone's gradient is not the small model's.
    assert _worst_departure("llama-gqa4", carry=True, clip=_clip_raw) > 1e-4


def test_carried_groups_follow_the_rule():
    model, opt, sched = _trained_small("llama-gqa4")
    lr_now = opt.param_groups[0]["lr"]
    exp_avg = opt.state[model.model.layers[0].mlp.up_proj.weight]["exp_avg"].clone()
    step = opt.state[model.model.layers[0].mlp.up_proj.weight]["step"].clone()
    grown = grow_training_state(model, opt, sched, width="2x")
    by_param = {id(p): g for g in grown.optimizer.param_groups for p in g["params"]}
    up = grown.model.model.layers[0].mlp.up_proj.weight  # reader of hidden (s = 1/2), ffn rows copied: c = 4, t = 1/2
    group = by_param[id(up)]
    assert group["lr"] == pytest.approx(lr_now / 2) and group["initial_lr"] == pytest.approx(LR / 2)
    assert group["weight_decay"] == pytest.approx(2 * WD) and group["eps"] == pytest.approx(1e-8 / 2)
    state = grown.optimizer.state[up]
    assert torch.equal(state["step"], step)
    assert torch.allclose(state["exp_avg"], exp_avg.repeat(2, 2) / 2)
    emb = by_param[id(grown.model.model.embed_tokens.weight)]  # writer, tiled unscaled (s = 1), copied twice (t = 1/2)
    assert emb["lr"] == pytest.approx(lr_now) and emb["eps"] == pytest.approx(1e-8 / 2)
    assert grown.scheduler.optimizer is grown.optimizer and grown.scheduler.last_epoch == BEFORE
    assert grown.uneven == []


def test_symmetric_noise_keeps_step_zero_exact_and_breaks_the_symmetry():
    model, opt, sched = _trained_small("llama-gqa4")
    x = _batches(BEFORE + 1)[BEFORE]
    with torch.no_grad():
        small_loss = float(model(input_ids=x, labels=x).loss)
    grown = grow_training_state(model, opt, sched, width="2x", noise_snr_db=10.0)
    with torch.no_grad():
        assert abs(float(grown.model(input_ids=x, labels=x).loss) - small_loss) <= 1e-5 * small_loss
    for x in _batches(BEFORE + 4)[BEFORE:]:
        _step(grown.model, grown.optimizer, grown.scheduler, x)
    up = grown.model.model.layers[0].mlp.up_proj.weight.detach()
    # FFN neuron i and its copy i + 48 read the stream through copied columns: noise made them different.
    assert not torch.allclose(up[:48, :32], up[48:, :32], atol=1e-4)


@pytest.mark.parametrize("request_", [dict(width="2x", method="copy-pad"), dict(width="1.5x", method="net2net"),
                                      dict(layers="2x", depth_method="stack"), dict(layers=4, depth_method="identity")],
                         ids=["copy-pad", "net2net", "stack", "identity"])
def test_every_operator_and_depth_method_gives_a_trainable_state(request_):
    model, opt, sched = _trained_small("llama-tied")
    grown = grow_training_state(model, opt, sched, **request_)
    carried = {p for g in grown.optimizer.param_groups for p in g["params"]}
    assert carried == set(grown.model.parameters())
    for p in carried:
        state = grown.optimizer.state[p]
        assert state["exp_avg"].shape == p.shape and float(state["step"]) == BEFORE
    if request_.get("method") == "copy-pad":  # fresh neurons start with zero moments, copies with the source's
        emb = grown.optimizer.state[grown.model.model.embed_tokens.weight]
        assert not emb["exp_avg"][:, 32:].any() and emb["exp_avg"][:, :32].any()
    if request_.get("method") == "net2net":  # uneven multiplicities: a group lr can only be their mean
        assert "model.layers.0.mlp.down_proj.weight" in grown.uneven
        down = grown.model.model.layers[0].mlp.down_proj.weight  # the clip's factors stay per entry
        weight = next(g for g in grown.optimizer.param_groups if g["params"][0] is down)[NORM_WEIGHT]
        assert torch.is_tensor(weight) and weight.shape == down.shape and weight.min() < weight.max()
    if request_.get("depth_method") == "identity":  # zeroed residual writers: fresh, zero moments, source lr
        o_proj = grown.model.model.layers[1].self_attn.o_proj.weight
        assert not grown.optimizer.state[o_proj]["exp_avg"].any()
    before = {n: p.detach().clone() for n, p in grown.model.named_parameters()}
    _step(grown.model, grown.optimizer, grown.scheduler, _batches(BEFORE + 1)[BEFORE], _clip_grown)
    assert all((p.detach() != before[n]).any() for n, p in grown.model.named_parameters())


def test_optimizers_other_than_adam_are_refused():
    model = _small("gpt2")
    with pytest.raises(GrowkitError, match="Adam or AdamW, got SGD"):
        grow_training_state(model, torch.optim.SGD(model.parameters(), lr=0.1), width="2x")


@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_untie_head_at_growth_is_exact_and_gives_the_head_its_own_state(family):
    model, opt, sched = _trained_small(family)
    x = _batches(BEFORE + 1)[BEFORE]
    with torch.no_grad():
        small_logits = model(input_ids=x).logits
    grown = grow_training_state(model, opt, sched, width="2x", untie_head=True)
    head, emb = grown.model.get_output_embeddings().weight, grown.model.get_input_embeddings().weight
    assert head is not emb and not grown.model.config.tie_word_embeddings
    with torch.no_grad():
        gap = (grown.model(input_ids=x).logits - small_logits).abs().max()
    assert gap <= 1e-5 * small_logits.abs().max()
    tied_avg = opt.state[model.get_input_embeddings().weight]["exp_avg"]
    head_state = grown.optimizer.state[head]
    assert torch.allclose(head_state["exp_avg"], tied_avg.repeat(1, 2))  # reads hidden: s = 1/2, c = 2, so t = 1
    before = head.detach().clone()
    _step(grown.model, grown.optimizer, grown.scheduler, x)
    assert not torch.equal(head.detach(), before) and not torch.equal(head, emb)


@pytest.mark.parametrize("mode", ["old", "new"])
def test_freeze_trains_only_the_new_or_only_the_old_entries(mode):
    model, opt, sched = _trained_small("llama-gqa4")
    grown = grow_training_state(model, opt, sched, width="2x", layers=4, depth_method="stack", noise_snr_db=10.0,
                                freeze=mode)
    before = {n: p.detach().clone() for n, p in grown.model.named_parameters()}
    for x in _batches(BEFORE + 3)[BEFORE:]:
        _step(grown.model, grown.optimizer, grown.scheduler, x)
    moved = {n: p.detach() != before[n] for n, p in grown.model.named_parameters()}
    old_block = moved["model.layers.1.mlp.up_proj.weight"]  # layer 1 is old; its first ffn x hidden block is old
    new_block = moved["model.layers.3.mlp.up_proj.weight"]  # stacked copy of layer 1: new throughout
    if mode == "old":  # only new entries train
        assert not old_block[:48, :32].any() and old_block[48:, 32:].all() and new_block.all()
    else:
        assert old_block[:48, :32].all() and not old_block[48:].any() and not old_block[:, 32:].any()
        assert not new_block.any()
    with pytest.raises(GrowkitError, match="freeze must be one of"):
        grow_training_state(model, opt, width="2x", freeze="everything")
