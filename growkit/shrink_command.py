"""`growkit shrink` and `growkit.shrink`: a smaller checkpoint initialised from a larger one.

Thin layer over the growth pipeline (`direction="shrink"`): the operator (`subclone`, `select`, or any other that can
shrink) decides which neurons, heads and blocks to keep; apply and the writer are shared with `grow`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from growkit.errors import GrowkitError
from growkit.grow_command import (
    AllowPickleOpt, BaseModelOpt, ConfigOpt, DryRunOpt, DtypeOpt, EstimatorOpt, ExpertsOpt, FfnOpt, HeadsOpt,
    HiddenOpt, KvHeadsOpt, OverwriteOpt, QuietOpt, SeedOpt, ShardSizeOpt, SrcArg, TopKOpt, experts_alone, run_experts,
    run_resize,
)
from growkit.operators.experts import ExpertRanking
from growkit.operators.shrink import FANIN_SITES, RESCALE_CHOICES, default_rescale
from growkit.pipeline import GrowResult, grow
from growkit.upcycle import UpcycleResult, change_experts

Opt = typer.Option
SHRINK_METHODS = "subclone | select | rc-sample"


#: Options that only one shrinking method reads, by method.
METHOD_OPTIONS = {"subclone": ("calibration", "tokenizer", "calibration_tokens", "rescale"), "rc-sample": ("estimator",)}


def shrink_options(method: str, calibration: list[str | Path] | str | Path | None = None,
                   tokenizer: str | Path | None = None, calibration_tokens: int | None = None,
                   rescale: str | None = None, estimator: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Operator options for a shrink, JSON-ready for the provenance; subclone records where importance came from
    and its rescale mode. An option meant for another method is an error, not silently ignored."""
    if isinstance(calibration, (str, Path)):
        calibration = [calibration]
    given = {k: v for k, v in dict(calibration=[str(c) for c in calibration or []] or None,
                                    tokenizer=None if tokenizer is None else str(tokenizer),
                                    calibration_tokens=calibration_tokens, rescale=rescale,
                                    estimator=estimator).items() if v is not None}
    for key in given:
        owner = next(m for m, keys in METHOD_OPTIONS.items() if key in keys)
        if owner != method:
            raise GrowkitError(f"--method {method} does not use --{key.replace('_', '-')} (only {owner} does)")
    from growkit.train.blocks import check_calibration_files

    check_calibration_files(given.get("calibration", []))
    options: dict[str, Any] = {**dict(extra or {}), **given}
    if method == "subclone":
        options.setdefault("importance", "activations" if given.get("calibration") else "weights")
        options.setdefault("rescale", default_rescale(bool(given.get("calibration") or options.get("calibration"))))
    return options


def expert_ranking(src: Path, experts: int | None, top_k: int | None, method: str, options: Mapping[str, Any],
                   given: dict[str, Any]) -> ExpertRanking:
    """How `shrink --experts` ranks experts: `--method subclone` (its calibration options) or `select`; every other
    option is refused beside --experts rather than ignored."""
    experts_alone(src, experts, top_k, given, dict(rescale=None, estimator=None, allow_nonfinite=False,
                                                    base_model=None, dry_run=False))
    if method not in ("subclone", "select"):
        raise GrowkitError(f"{src}: --experts ranks experts with --method subclone (importance) or select (strided), "
                           f"not {method}")
    return ExpertRanking(method, list(options.get("calibration") or []), options.get("tokenizer"),
                         int(options.get("calibration_tokens") or 8192))


def shrink(src: str | Path, out: str | Path | None = None, *, width: str | float | None = None,
           hidden: int | None = None, ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
           layers: str | int | None = None, method: str = "subclone",
           calibration: list[str | Path] | str | Path | None = None, tokenizer: str | Path | None = None,
           calibration_tokens: int | None = None, rescale: str | None = None, estimator: str | None = None,
           seed: int = 0,
           dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
           quiet: bool = False, config: str | Path | Mapping[str, Any] | None = None, verify: bool = False,
           allow_pickle: bool = False, allow_nonfinite: bool = False, base_model: str | None = None,
           command: str | None = None, operator_options: Mapping[str, Any] | None = None,
           experts: int | None = None, top_k: int | None = None) -> GrowResult | UpcycleResult:
    """Shrink the checkpoint at `src` into a new checkpoint directory (default `SRC-shrunk` beside it).

    `experts` (a MoE model, alone): keep that many routed experts per layer (`growkit.operators.experts`): exactly
    where the dropped ones are copies of kept ones, else the most important (subclone: the routed weight and output
    each expert gets on the calibration text, weight norms without; select: evenly strided), announced as inexact.
    `top_k` goes with it (default: the one that keeps copies exact, else the source's).

    `calibration`: text files for activation importance (subclone); without them subclone ranks by weight norms.
    `rescale`: subclone's scale correction, "auto" | "none" | "norm" | "fanin" | "fanin:SITES"; the default is
    "auto" with calibration text (every fixed mode is built and the one with the lowest loss on held-out calibration
    tokens is kept; the choice and the losses go into growkit.json) and "fanin" without (see
    `growkit.operators.shrink.Subclone`).
    `estimator`: rc-sample's fitted measure (where that operator is installed).
    """
    options = shrink_options(method, calibration, tokenizer, calibration_tokens, rescale, estimator, operator_options)
    if experts is not None or top_k is not None:
        ranking = expert_ranking(Path(src), experts, top_k, method, options,
                                 dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                                      layers=layers, rescale=rescale, estimator=estimator,
                                      allow_nonfinite=allow_nonfinite, base_model=base_model))
        return change_experts(src, out, experts=experts or 0, direction="shrink", top_k=top_k, ranking=ranking,
                              seed=seed, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                              quiet=quiet, config=config, verify=verify, allow_pickle=allow_pickle, command=command)
    return grow(src, out, width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
                method=method, depth_method=None, seed=seed, dtype=dtype,  # type: ignore[arg-type]
                max_shard_size=max_shard_size, overwrite=overwrite, quiet=quiet, config=config, verify=verify,
                allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, base_model=base_model, command=command,
                direction="shrink", operator_options=options or None)


def shrink_command(
    src: SrcArg,
    out: Annotated[Optional[Path], Opt("--out", "-o", help="Output directory (default: SRC-shrunk beside SRC)")] = None,
    width: Annotated[Optional[str], Opt(help="Scale hidden, ffn, heads and kv heads together, e.g. 0.5x")] = None,
    hidden: HiddenOpt = None,
    ffn: FfnOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    layers: Annotated[Optional[str], Opt(help="Target layers: N or a factor like 0.5x")] = None,
    method: Annotated[str, Opt(help=SHRINK_METHODS)] = "subclone",
    calibration: Annotated[Optional[list[Path]], Opt(help="subclone: text file(s) for activation importance "
                                                     "(repeat the option for several); without it, weight norms")] = None,
    tokenizer: Annotated[Optional[Path], Opt(help="subclone: tokenizer directory (default: the checkpoint's)")] = None,
    calibration_tokens: Annotated[Optional[int], Opt("--calibration-tokens",
                                                     help="subclone: calibration tokens to use (default 8192)")] = None,
    rescale: Annotated[Optional[str], Opt(help=f"subclone: {' | '.join(RESCALE_CHOICES)}, SITES a +-joined subset of "
                                          f"{', '.join(FANIN_SITES)} (default: auto with --calibration, the mode "
                                          "with the lowest loss on held-out calibration tokens; fanin without)")] = None,
    estimator: EstimatorOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    max_shard_size: ShardSizeOpt = "5GB",
    config: ConfigOpt = None,
    base_model: BaseModelOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    verify: Annotated[bool, Opt(help="Load source and output with transformers and compare logits and loss")] = False,
    allow_pickle: AllowPickleOpt = False,
    allow_nonfinite: Annotated[bool, Opt("--allow-nonfinite", help="Shrink weights with NaN/Inf")] = False,
    quiet: QuietOpt = False,
    experts: ExpertsOpt = None,
    top_k: TopKOpt = None,
) -> None:
    """Shrink a checkpoint in width and/or depth (subclone: keep the most important neurons, heads and blocks), or a
    MoE checkpoint's experts with --experts (the most important, or exactly where they are copies)."""
    operator_options = shrink_options(method, calibration, tokenizer, calibration_tokens, rescale, estimator)
    if experts is not None or top_k is not None:
        ranking = expert_ranking(src, experts, top_k, method, operator_options,
                                 dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                                      layers=layers, rescale=rescale, estimator=estimator,
                                      allow_nonfinite=allow_nonfinite, base_model=base_model, dry_run=dry_run))
        run_experts(src, out, quiet, verify, experts=experts, direction="shrink", top_k=top_k, ranking=ranking,
                    seed=seed, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, config=config,
                    allow_pickle=allow_pickle)
        return
    options = dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, method=method,
                   depth_method=None, seed=seed, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                   base_model=base_model, allow_nonfinite=allow_nonfinite, direction="shrink",
                   operator_options=operator_options or None)
    run_resize(src, out, dry_run, quiet, verify, options, config, allow_pickle)
