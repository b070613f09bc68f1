"""Function-preservation checks: load source and grown models with `transformers` and compare their logits."""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from growkit.arch.moe import LAYOUTS, fused_experts
from growkit.arch.registry import family_for
from growkit.checkpoint.files import tokenizer_files
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.train.moe import lm_loss_only  # a trained MoE config (output_router_logits) would add the aux loss


def _no_weight_init() -> Any:
    """transformers' context that skips random weight initialisation (its module moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def empty_model(config: Mapping[str, Any]) -> Any:
    """A fp32 `transformers` model of `config` whose weights are allocated but not initialised: every weight is about
    to be overwritten, and a random init of a 100M-parameter model costs seconds and writes every page of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    # a MoE model runs transformers' eager expert kernel, the reference one: its default (grouped_mm) refuses expert
    # rows that are not a multiple of 16 bytes, which shrinking the experts' neurons makes
    kernel = {"experts_implementation": "eager"} if config.get("model_type") in LAYOUTS else {}
    with _no_weight_init():
        return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, **kernel)


def fill_model(model: Any, tensors: Iterable[tuple[str, torch.Tensor]], tied: bool) -> tuple[list[str], list[str]]:
    """Copy named tensors into `model`'s weights one at a time (so only one tensor besides the model is alive) and
    return the weights left unfilled (a tied head excepted) and the names it does not know. With a tied head the
    embedding is the head, so a stale `lm_head.weight` is not copied over it."""
    own = model.state_dict()
    head = {"lm_head.weight"} if tied else set()
    filled: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in fused_experts(model.config.to_dict(), iter(tensors)):
            if name in head:
                continue
            if name not in own:
                unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise RuntimeError(f"{name}: shape {list(tensor.shape)} does not fit the model's "
                                   f"{list(own[name].shape)}")
            own[name].copy_(tensor)
            filled.add(name)
    model.tie_weights()
    return sorted(set(own) - filled - head), sorted(unexpected)


def model_with_weights(config: Mapping[str, Any],
                       state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       tied: bool) -> tuple[Any, list[str], list[str]]:
    """A fp32 `transformers` model of `config` holding `state` (a mapping or (name, tensor) pairs, consumed one
    at a time), with the weights it lacks (a tied head excepted) and the names it does not know."""
    model = empty_model(config)
    missing, unexpected = fill_model(model, state.items() if isinstance(state, Mapping) else state, tied)
    return model, missing, unexpected


def model_from_checkpoint(ckpt: Checkpoint) -> Any:
    """A fp32 `transformers` model with the checkpoint's weights, whatever the checkpoint's form (dir, file, memory);
    tensors are read one at a time, so the peak is the model plus one tensor."""
    family = family_for(ckpt.config, ckpt.source)
    tensors = ((name, ckpt.get(name)) for name in ckpt.names())
    model, missing, unexpected = model_with_weights(ckpt.config, tensors, family.tied(ckpt.config))
    buffers = {n for n, _ in model.named_buffers()}
    stray = [n for n in unexpected if n not in buffers and not n.endswith(family.ignorable)]
    if missing or stray:
        raise GrowkitError(f"{ckpt.source}: weights do not fit the config (missing {missing[:3]}, "
                           f"unexpected {stray[:3]})")
    return model.eval()


def load_grown(directory: Path, experts_implementation: str | None = None) -> tuple[Any, dict[str, list[str]]]:
    """Load a written checkpoint exactly as a user would, returning the model and transformers' loading report;
    `experts_implementation` picks a MoE model's expert kernel (transformers' default when None)."""
    from transformers import AutoModelForCausalLM

    kernel = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True,
                                                       **kernel)
    return model.eval(), {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}


def random_tokens(vocab: int, seed: int = 0, batch: int = 2, length: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, length), generator=gen)


@torch.no_grad()
def compare(model_a: Any, model_b: Any, tokens: torch.Tensor) -> dict[str, float]:
    """max |Δlogits| and the next-token (language-model) loss of both models on the same tokens."""
    out_a = model_a(input_ids=tokens, labels=tokens, **lm_loss_only(model_a))
    out_b = model_b(input_ids=tokens, labels=tokens, **lm_loss_only(model_b))
    return {
        "max_abs_dlogits": float((out_a.logits - out_b.logits).abs().max()),
        "max_abs_logit": float(out_a.logits.abs().max()),  # scale of the fp32 rounding in the gap
        "source_loss": float(out_a.loss),
        "grown_loss": float(out_b.loss),
        "dloss": float(out_b.loss - out_a.loss),
    }


@torch.no_grad()
def next_token_loss(model: Any, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over every predicted token of `tokens` [n, len] (batched; the same number as one
    `model(input_ids=tokens, labels=tokens).loss`)."""
    total, count = 0.0, 0
    for batch in tokens.split(batch_size):
        predicted = batch.shape[0] * (batch.shape[1] - 1)
        total += float(model(input_ids=batch, labels=batch, **lm_loss_only(model)).loss) * predicted
        count += predicted
    return total / count


def text_tokens(directory: Path, length: int) -> tuple[torch.Tensor | None, str]:
    """Real text for the check, when the checkpoint has a tokenizer: the start of the stdlib's `textwrap.py`
    (present wherever Python is), so the loss means something. Without it, None and the reason."""
    from transformers import AutoTokenizer

    if not tokenizer_files(directory):
        return None, "the checkpoint has no tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 - any failure means no real text; the reason is reported, not hidden
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"its tokenizer did not load ({type(exc).__name__}: {first})"
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tokenizer(text[: 16 * length], verbose=False)["input_ids"][: 2 * length]
    if len(ids) < 2 * length:
        return None, f"its tokenizer gave {len(ids)} tokens, fewer than {2 * length}"
    return torch.tensor(ids).reshape(2, length), ""


def verify_growth(ckpt: Checkpoint, directory: Path, seed: int = 0) -> dict[str, Any]:
    """Compare the source with the checkpoint written to `directory`: on real text when there is a tokenizer,
    else on random tokens, saying why (on stderr too when a tokenizer is there but unusable). A MoE output is run
    with transformers' eager expert kernel, the reference one: its default (grouped_mm) refuses expert rows that are
    not a multiple of 16 bytes, which a shrink to a few neurons per expert makes."""
    source = model_from_checkpoint(ckpt)
    moe = source.config.model_type in LAYOUTS
    grown, info = load_grown(directory, "eager" if moe else None)
    sizes = family_for(ckpt.config, ckpt.source).sizes(ckpt.config)
    length = min(64, sizes.positions or 64)
    tokens, why_not = text_tokens(directory, length)
    what = f"stdlib textwrap.py, {2 * length} tokens"
    if tokens is None:
        tokens = random_tokens(sizes.vocab, seed=seed, length=length)
        what = f"random tokens {tuple(tokens.shape)}, seed {seed} ({why_not})"
        if tokenizer_files(directory):
            print(f"growkit: note: --verify compared on random tokens: {why_not}", file=sys.stderr)
    kernel = {"experts_implementation": "eager"} if moe else {}
    return {**compare(source, grown, tokens), "tokens": what, **info, **kernel}
