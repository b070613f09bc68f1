"""`growkit upcycle`: the command-line face of `growkit.upcycle`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from growkit.errors import Interrupted
from growkit.grow_command import (
    AllowPickleOpt, ConfigOpt, DtypeOpt, OverwriteOpt, QuietOpt, SeedOpt, ShardSizeOpt, SrcArg, verification_line,
)
from growkit.operators.upcycle import ROUTER_HELP
from growkit.upcycle import upcycle

Opt = typer.Option


def upcycle_command(
    src: SrcArg,
    experts: Annotated[int, Opt("--experts", help="Routed experts per layer")],
    out: Annotated[Optional[Path], Opt("--out", "-o", help="Output directory (default: SRC-moe beside SRC)")] = None,
    top_k: Annotated[Optional[int], Opt("--top-k", help="Experts each token is routed to (default 2; for a MoE "
                                                        "source, its top-k times the copies of each expert)")] = None,
    to: Annotated[Optional[str], Opt(help="Target family where several fit: mixtral (from llama/mistral), "
                                          "qwen2_moe (from qwen2), qwen3_moe (from qwen3)")] = None,
    granularity: Annotated[int, Opt(help="Split the FFN into G slices; each expert is one slice (fine-grained "
                                         "experts, ffn/G neurons each)")] = 1,
    shared_experts: Annotated[int, Opt("--shared-experts", help="Slices that form the always-on shared expert "
                                                                "(qwen2_moe)")] = 0,
    router: Annotated[str, Opt(help="Router initialisation: random | zero. random: "
                                    + ROUTER_HELP["random"] + ". zero: " + ROUTER_HELP["zero"])] = "random",
    router_std: Annotated[Optional[float], Opt("--router-std", help="Std of random router rows (default: the "
                                                                    "config's initializer_range, else 0.02)")] = None,
    expert_noise: Annotated[Optional[float], Opt("--expert-noise", help="Noise on the experts' down_proj, "
                                                 "signal-to-noise in dB, summing to zero over each slice's copies")] = None,
    reinit_ratio: Annotated[float, Opt("--reinit-ratio", help="Drop-Upcycling: share of each expert's neurons "
                                                              "re-drawn from the dense weights' mean and std")] = 0.0,
    norm_topk_prob: Annotated[bool, Opt("--norm-topk-prob/--no-norm-topk-prob",
                                        help="Qwen MoEs: renormalise the top-k weights to sum to 1")] = True,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    max_shard_size: ShardSizeOpt = "5GB",
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
    verify: Annotated[bool, Opt(help="Load dense and MoE models with transformers and compare logits")] = False,
    allow_pickle: AllowPickleOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn a dense checkpoint into a mixture of experts (sparse upcycling), or give a MoE checkpoint more experts
    by copying its own, streamed into a new checkpoint."""
    target = out
    existed = target is not None and target.exists()
    try:
        result = upcycle(src, out, experts=experts, top_k=top_k, to=to, granularity=granularity,
                         shared_experts=shared_experts, router=router, router_std=router_std,
                         expert_noise=expert_noise, reinit_ratio=reinit_ratio, norm_topk_prob=norm_topk_prob,
                         seed=seed, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, quiet=quiet,
                         config=config, verify=verify, allow_pickle=allow_pickle,
                         command=shlex.join(["growkit", *sys.argv[1:]]))
    except KeyboardInterrupt as exc:  # typer would swallow it into a silent exit 130
        kept = "left unchanged" if existed else "not written"
        raise Interrupted(f"{out or src}: interrupted by {exc or 'SIGINT'}; {kept} (partial files removed)") from None
    p = result.provenance
    if not quiet:
        params = p["parameters"]
        print(f"wrote {result.out_dir} ({p['target']['model_type']}, {p['target']['experts']} experts, top-"
              f"{p['target']['top_k']}: {params['total']:,} parameters, {params['active']:,} active per token; "
              f"source {params['source']:,}; exact at step 0: {'yes' if p['exact_at_step_0'] else 'no'})")
    if p["verification"]:
        print(verification_line(p["verification"]))
