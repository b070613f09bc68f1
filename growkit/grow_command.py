"""`growkit grow`: the command-line face of `growkit.grow`, with a dry-run table and a verification summary."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from growkit.arch.spec import parameter_count
from growkit.checkpoint.reader import load_checkpoint
from growkit.operators.depth import DEPTH_METHODS
from growkit.errors import GrowkitError, Interrupted
from growkit.pipeline import Growth, default_output, grow, plan_growth

Opt = typer.Option

#: Options `grow` and `shrink` share, declared once.
SrcArg = Annotated[Path, typer.Argument(help="Checkpoint directory or .safetensors file")]
HiddenOpt = Annotated[Optional[int], Opt(help="Target hidden size")]
FfnOpt = Annotated[Optional[int], Opt(help="Target FFN (intermediate) size")]
HeadsOpt = Annotated[Optional[int], Opt(help="Target attention heads (head_dim is kept)")]
KvHeadsOpt = Annotated[Optional[int], Opt("--kv-heads", help="Target key/value heads")]
EstimatorOpt = Annotated[Optional[str], Opt(help="rc-sample: empirical | kde | gaussian")]
SeedOpt = Annotated[int, Opt(help="Random seed")]
DtypeOpt = Annotated[Optional[str], Opt(help="Output dtype (default: the source's)")]
ShardSizeOpt = Annotated[str, Opt("--max-shard-size", help="Largest shard, e.g. 5GB or 500MiB")]
ConfigOpt = Annotated[Optional[Path], Opt(help="config.json for a bare .safetensors file")]
BaseModelOpt = Annotated[Optional[str], Opt("--base-model", help="Hub id of the source, for the model card")]
OverwriteOpt = Annotated[bool, Opt(help="Replace OUT if it exists")]
DryRunOpt = Annotated[bool, Opt("--dry-run", help="Print the plan and write nothing")]
AllowPickleOpt = Annotated[bool, Opt("--allow-pickle", help="Load pytorch_model.bin (weights_only)")]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="No progress bar")]
ExpertsOpt = Annotated[Optional[int], Opt("--experts", help="MoE models: routed experts per layer (alone, without "
                                                          "size options)")]
TopKOpt = Annotated[Optional[int], Opt("--top-k", help="With --experts: experts per token (default: the one that "
                                                      "keeps the function where that exists, else the source's)")]
#: The size options `--experts` cannot be combined with in one call.
SIZE_OPTIONS = ("width", "hidden", "ffn", "heads", "kv_heads", "layers")


def plan_table(growth: Growth, title: str) -> Table:
    """Old -> new size of every axis, and parameter counts: what `--dry-run` shows before anything is written."""
    table = Table(title=title)
    for col in ("axis", "source", "target", "ratio"):
        table.add_column(col, justify="left" if col == "axis" else "right")
    for axis, old, new in growth.plan.rows():
        table.add_row(axis, str(old), str(new), f"{new / old:.3g}x")
    p_old = parameter_count(growth.specs, growth.plan.source)
    p_new = parameter_count(growth.specs, growth.plan.target)
    table.add_row("parameters", f"{p_old:,}", f"{p_new:,}", f"{p_new / p_old:.3g}x")
    return table


def verification_line(v: dict[str, Any]) -> str:
    keys = "no missing or unexpected keys" if not (v["missing_keys"] or v["unexpected_keys"]) else (
        f"missing {v['missing_keys']}, unexpected {v['unexpected_keys']}")
    return (f"function preservation: max |Δlogits| = {v['max_abs_dlogits']:.3g} (max |logit| "
            f"{v['max_abs_logit']:.3g}), loss {v['source_loss']:.4f} -> "
            f"{v['grown_loss']:.4f} (Δ {v['dloss']:+.3g}) on {v['tokens']}; transformers loaded it with {keys}"
            + ("; both read with the config inferred from tensor shapes, which this check cannot confirm"
               if v.get("config_inferred") else ""))


def run_resize(src: Path, out: Optional[Path], dry_run: bool, quiet: bool, verify: bool, options: dict[str, Any],
               config: Optional[Path], allow_pickle: bool) -> None:
    """Shared body of `grow` and `shrink`: plan (and print) first, then stream the checkpoint."""
    console = Console(stderr=quiet)
    if dry_run:
        ckpt = load_checkpoint(src, config=config, allow_pickle=allow_pickle, quiet=quiet)
        keys = ("width", "hidden", "ffn", "heads", "kv_heads", "layers", "method", "depth_method", "seed",
                "direction", "operator_options", "noise_snr_db")
        growth = plan_growth(ckpt, **{k: v for k, v in options.items() if k in keys})
        console.print(plan_table(growth, f"{src} ({ckpt.model_type}), --method {growth.plan.method}: dry run, "
                                         "nothing written"))
        return
    target = out if out is not None else default_output(src, options.get("direction", "grow"))
    existed = target.exists()
    try:
        result = grow(src, out, quiet=quiet, verify=verify, config=config, allow_pickle=allow_pickle,
                      command=shlex.join(["growkit", *sys.argv[1:]]), **options)
    except KeyboardInterrupt as exc:  # typer would swallow it into a silent exit 130
        signame = str(exc) or "SIGINT"
        kept = "left unchanged" if existed else "not written"
        raise Interrupted(f"{target}: interrupted by {signame}; {kept} (partial files removed)") from None
    if not quiet:
        console.print(f"wrote {result.out_dir}")
    if result.provenance["verification"]:
        print(verification_line(result.provenance["verification"]))


def experts_alone(src: Path, experts: int | None, top_k: int | None, options: dict[str, Any],
                  defaults: dict[str, Any]) -> None:
    """`--experts` changes the number of experts and nothing else (its own plan and writer, `growkit.upcycle`):
    a size option or a non-default option of the width operators beside it is refused, not ignored."""
    if experts is None:
        if top_k is not None:
            raise GrowkitError(f"{src}: --top-k goes with --experts")
        return
    given = [k for k in SIZE_OPTIONS if options.get(k) is not None]
    given += [k for k, v in defaults.items() if options.get(k, v) != v]
    if given:
        raise GrowkitError(f"{src}: --experts cannot be combined with --{given[0].replace('_', '-')} in one call: "
                           "run two commands, one for the experts and one for the rest")


def run_experts(src: Path, out: Optional[Path], quiet: bool, verify: bool, **options: Any) -> None:
    """`grow --experts` / `shrink --experts` on the command line: write, then one line of what was written."""
    from growkit.upcycle import change_experts

    result = change_experts(src, out, quiet=quiet, verify=verify, command=shlex.join(["growkit", *sys.argv[1:]]),
                            **options)
    p = result.provenance
    if not quiet:
        kept = p.get("experts_kept")
        print(f"wrote {result.out_dir} ({p['target']['experts']} experts, top-{p['target']['top_k']}"
              + (f", kept by {kept['ranked_by']}" if kept else "")
              + f"; exact at step 0: {'yes' if p['exact_at_step_0'] else 'no'})")
    if p["verification"]:
        print(verification_line(p["verification"]))


def grow_command(
    src: SrcArg,
    out: Annotated[Optional[Path], Opt("--out", "-o", help="Output directory (default: SRC-grown beside SRC)")] = None,
    width: Annotated[Optional[str], Opt(help="Scale hidden, ffn, heads and kv heads together, e.g. 2x")] = None,
    hidden: HiddenOpt = None,
    ffn: FfnOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    layers: Annotated[Optional[str], Opt(help="Target layers: N or a factor like 2x")] = None,
    method: Annotated[str, Opt(help="clone | copy-pad | net2net | rc-sample")] = "clone",
    depth_method: Annotated[str, Opt("--depth-method", help=" | ".join(DEPTH_METHODS))] = "stack",
    noise_snr_db: Annotated[Optional[float], Opt("--noise-snr-db", help="Symmetric noise on cloned readers "
                                                 "(signal-to-noise in dB); keeps the function exact")] = None,
    estimator: EstimatorOpt = None,
    sampling: Annotated[Optional[str], Opt(help="rc-sample: how extra neurons' atoms are drawn, iid | stratified "
                                           "(systematic: each atom floor or ceil of the average count)")] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    max_shard_size: ShardSizeOpt = "5GB",
    config: ConfigOpt = None,
    base_model: BaseModelOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    verify: Annotated[bool, Opt(help="Load source and output with transformers and compare logits")] = False,
    allow_pickle: AllowPickleOpt = False,
    allow_nonfinite: Annotated[bool, Opt("--allow-nonfinite", help="Grow weights with NaN/Inf")] = False,
    quiet: QuietOpt = False,
    experts: ExpertsOpt = None,
    top_k: TopKOpt = None,
) -> None:
    """Grow a checkpoint in width and/or depth, streamed tensor by tensor into a new Hugging Face checkpoint; a MoE
    checkpoint's experts with --experts (each copied, as `growkit upcycle` does)."""
    experts_alone(src, experts, top_k, dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                                            layers=layers, method=method, depth_method=depth_method,
                                            noise_snr_db=noise_snr_db, estimator=estimator, sampling=sampling,
                                            dry_run=dry_run, allow_nonfinite=allow_nonfinite, base_model=base_model),
                  dict(method="clone", depth_method="stack", noise_snr_db=None, estimator=None, sampling=None,
                       dry_run=False, allow_nonfinite=False, base_model=None))
    if experts is not None:
        run_experts(src, out, quiet, verify, experts=experts, direction="grow", top_k=top_k, seed=seed, dtype=dtype,
                    max_shard_size=max_shard_size, overwrite=overwrite, config=config, allow_pickle=allow_pickle)
        return
    operator_options = {k: v for k, v in dict(estimator=estimator, sampling=sampling).items() if v is not None}
    options = dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, method=method,
                   depth_method=depth_method, noise_snr_db=noise_snr_db, seed=seed, dtype=dtype,
                   max_shard_size=max_shard_size, overwrite=overwrite, base_model=base_model,
                   allow_nonfinite=allow_nonfinite, operator_options=operator_options or None)
    run_resize(src, out, dry_run, quiet, verify, options, config, allow_pickle)
