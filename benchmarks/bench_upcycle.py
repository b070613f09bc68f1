"""Sparse upcycling on CPU: does a dense model upcycled into a mixture of experts train better than the dense model
continued, at equal steps and at equal active FLOPs, and than the same MoE from scratch? Over several seeds.

For each seed a small dense Llama is trained on the stdlib split (the seed sets its initialisation and the data
order, so the seed spread includes the dense model's own); from it, with the same data order, schedule and LR:
(a) the dense model continued for the same further steps; (b) upcycled Mixtral, E in {4, 8}, top-2
(`growkit upcycle`); (c) fine-grained upcycling, granularity 4 and 16 experts of a quarter of the dense FFN each:
top-8 (active and total parameters as E4 top-2) and top-4 (the dense model's active FFN); (d) the E8 top-2 MoE from
scratch, trained for the dense model's steps plus the further steps; (e) the dense model continued at equal active
FLOPs: given as many more steps as an upcycled run's FLOPs buy (one run per distinct budget, its own cosine schedule
over its own length). FLOPs per token: `flops_per_token`, 6 x active parameters (router and the top-k experts'
FFNs, not the skipped experts) + 6 L T d for attention scores and mixing. Reported: validation loss curves (JSON, and
a PNG against total training steps and against total active training FLOPs, the dense pre-training included), per
seed and mean, each MoE's gap to dense continuation per seed, and each expert's share of the routed tokens on the
validation blocks at the end (load balance).

    python benchmarks/bench_upcycle.py --dense-steps 150 --steps 100 --batch 8 --seeds 0,1,2
    python benchmarks/bench_upcycle.py --report benchmarks/results/upcycle/NAME.json   # tables and plot again

`--router-z-loss-coef` adds the router z-loss to the MoE runs (default 0, as the runs in RESULTS.md); `--smoke`
runs every code path in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from _train_common import EVAL_BLOCKS, REPO, SEQ, flops_per_token, fmt, prepare_run, run, save_json, save_png

sys.path.insert(0, str(REPO))
from growkit.upcycle import upcycle  # noqa: E402

DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False)
DENSE_FFN = 176
DENSE = "dense continued"
SCRATCH = "MoE E8 top-2 from scratch"
#: label -> upcycle options
UPCYCLED = {
    "upcycled E4 top-2": dict(experts=4, top_k=2),
    "upcycled E8 top-2": dict(experts=8, top_k=2),
    "fine-grained G4 E16 top-8": dict(experts=16, top_k=8, granularity=4),
    "fine-grained G4 E16 top-4": dict(experts=16, top_k=4, granularity=4),
}
#: `--smoke`: every code path in seconds (a little of the corpus, few steps, few validation blocks)
SMOKE = dict(dense_steps=4, steps=4, eval_every=2, eval_blocks=8, max_bytes=(300_000, 60_000))


def dense_config(vocab: int):
    import transformers as T

    return T.LlamaConfig(vocab_size=vocab, intermediate_size=DENSE_FFN, **DIMS)


def scratch_moe_config(vocab: int):
    import transformers as T

    return T.MixtralConfig(vocab_size=vocab, intermediate_size=DENSE_FFN, num_local_experts=8, num_experts_per_tok=2,
                           **DIMS)


def equal_flops_label(steps: int) -> str:
    return f"dense continued {steps} steps (equal FLOPs)"


def equal_flops_steps(runs: dict, label: str) -> int:
    """Steps of dense continuation after the dense pre-training whose total active FLOPs equal run `label`'s (the
    pre-training included: an upcycled run's FLOPs start there, the MoE from scratch's at 0)."""
    pre, dense = runs["dense pre-training"], runs[DENSE]
    flops_per_step = (dense["total_flops"][1] - dense["total_flops"][0]) / dense["steps"][1]
    return round((runs[label]["total_flops"][-1] - pre["total_flops"][-1]) / flops_per_step)


@torch.no_grad()
def expert_shares(model, val_blocks, eval_blocks: int, batch: int = 16) -> list[list[float]]:
    """Per layer, each expert's share of the routed (token, slot) choices on the validation blocks."""
    model.eval()
    counts = None
    n = min(eval_blocks, len(val_blocks))
    for i in range(0, n, batch):
        x = val_blocks.batch(list(range(i, min(i + batch, n))))
        logits = model(input_ids=x, output_router_logits=True).router_logits
        k = model.config.num_experts_per_tok
        layer_counts = torch.stack([torch.bincount(lg.topk(k, dim=-1).indices.reshape(-1), minlength=lg.shape[-1])
                                    for lg in logits]).double()
        counts = layer_counts if counts is None else counts + layer_counts
    assert counts is not None
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def balance(shares: list[list[float]]) -> str:
    """Largest and smallest expert share over all layers, against the uniform 1/E."""
    flat = [s for layer in shares for s in layer]
    return f"{min(flat):.3f}-{max(flat):.3f} (1/E {1 / len(shares[0]):.3f})"


def run_seed(seed: int, args, tok, train_blocks, val_blocks, acc, work: Path, save) -> dict:
    """Every run of one seed; `save(runs)` after each."""
    import transformers as T

    common = dict(lr=args.lr, eval_every=args.eval_every, seed=seed, accelerator=acc, batch_size=args.batch,
                  eval_blocks=args.eval_blocks)
    tokens_per_step = args.batch * SEQ
    moe = dict(router_aux_loss_coef=args.aux, router_z_loss_coef=args.router_z_loss_coef)
    runs: dict = {}

    def record(label: str, model, curve, start_flops: float = 0.0, start_step: int = 0) -> None:
        entry = curve.as_dict()
        fpt = flops_per_token(model.config, SEQ)
        entry["flops_per_token"] = fpt
        entry["total_steps"] = [start_step + s for s in curve.steps]
        entry["total_flops"] = [start_flops + s * tokens_per_step * fpt for s in curve.steps]
        if getattr(model.config, "num_experts_per_tok", None):
            entry["expert_shares"] = expert_shares(model, val_blocks, args.eval_blocks)
        entry["parameters"] = sum(p.numel() for p in model.parameters())
        runs[label] = entry
        print(f"seed {seed} {label}: val {fmt(curve.losses[-1], '.4f')} after {curve.completed} steps, "
              f"{curve.seconds:.0f} s", file=sys.stderr, flush=True)
        save(runs)

    torch.manual_seed(seed)
    dense = T.AutoModelForCausalLM.from_config(dense_config(len(tok)))
    record("dense pre-training", dense, run(dense, "dense pre-training", train_blocks, val_blocks,
                                           steps=args.dense_steps, **common))
    pre_flops = runs["dense pre-training"]["total_flops"][-1]
    dense_dir = work / f"dense-{seed}"
    dense.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    after = dict(start_flops=pre_flops, start_step=args.dense_steps)

    model = T.AutoModelForCausalLM.from_pretrained(dense_dir)
    record(DENSE, model, run(model, DENSE, train_blocks, val_blocks, steps=args.steps, **common), **after)
    for label, options in UPCYCLED.items():
        out = upcycle(dense_dir, work / f"{label.replace(' ', '-')}-{seed}", quiet=True, seed=seed, **options).out_dir
        model = T.AutoModelForCausalLM.from_pretrained(out)
        record(label, model, run(model, label, train_blocks, val_blocks, steps=args.steps, **moe, **common),
               **after)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(scratch_moe_config(len(tok)))
    record(SCRATCH, model, run(model, SCRATCH, train_blocks, val_blocks, steps=args.dense_steps + args.steps,
                               **moe, **common))
    # Dense continuation at each MoE run's active FLOPs: more steps, one schedule over them.
    for n in sorted({equal_flops_steps(runs, label) for label in [*UPCYCLED, SCRATCH]} - {args.steps}):
        model = T.AutoModelForCausalLM.from_pretrained(dense_dir)
        label = equal_flops_label(n)
        record(label, model, run(model, label, train_blocks, val_blocks, steps=n, **common), **after)
    return runs


def mean_spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def gap_cell(gaps: list[float]) -> str:
    """Per-seed gaps (run minus reference, nats; negative: the run is lower), their mean and how many are below."""
    below = sum(g < 0 for g in gaps)
    return f"{' / '.join(f'{g:+.4f}' for g in gaps)} (mean {statistics.mean(gaps):+.4f}; lower in {below}/{len(gaps)})"


def tables(results: dict) -> str:
    """Markdown: per seed and mean final validation loss, gaps at equal steps and at equal active FLOPs, balance."""
    seeds = list(results["seeds"])
    per_seed = [results["seeds"][s] for s in seeds]
    labels = [k for k in per_seed[0] if k != "dense pre-training"]
    steps = int(results["args"]["steps"])
    rows = ["| run | steps (total) | active GFLOPs (total) | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean ± sd | expert shares, seed " + seeds[0] + " (min-max) |",
            "|---|---|---|" + "---|" * len(seeds) + "---|---|"]
    for label in labels:
        r0 = per_seed[0][label]
        finals = [r[label]["losses"][-1] for r in per_seed]
        rows.append(f"| {label} | {r0['total_steps'][-1]} | {r0['total_flops'][-1] / 1e9:.1f} | "
                    + " | ".join(f"{v:.4f}" for v in finals) + f" | {mean_spread(finals)} | "
                    + (balance(r0["expert_shares"]) if "expert_shares" in r0 else "-") + " |")
    dense = [r[DENSE]["losses"][-1] for r in per_seed]
    rows += ["", f"Final validation loss minus the dense model's (per seed {' / '.join(seeds)}; the dense model "
             f"continued {steps} steps, or continued for the run's active FLOPs):", "",
             "| run | vs dense, equal steps | vs dense, equal active FLOPs |", "|---|---|---|"]
    for label in [*UPCYCLED, SCRATCH]:
        finals = [r[label]["losses"][-1] for r in per_seed]
        n = equal_flops_steps(per_seed[0], label)
        ref = DENSE if n == steps else equal_flops_label(n)
        at_flops = (gap_cell([f - r[ref]["losses"][-1] for f, r in zip(finals, per_seed)]) + f" ({ref})"
                    if ref in per_seed[0] else f"not run (dense for {n} steps)")
        rows.append(f"| {label} | {gap_cell([f - d for f, d in zip(finals, dense)])} | {at_flops} |")
    return "\n".join(rows)


def plot(results: dict, png: Path) -> None:
    """Mean validation loss over seeds against total training steps and total active FLOPs (pre-training included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_seed = list(results["seeds"].values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    for i, label in enumerate(per_seed[0]):
        curves = [r[label]["losses"] for r in per_seed]
        mean = [statistics.mean(v) for v in zip(*curves)]
        style = "-" if label == "dense pre-training" else ("--" if label.startswith("dense") else "o-")
        for ax, key, scale in ((axes[0], "total_steps", 1), (axes[1], "total_flops", 1e9)):
            x = [v / scale for v in per_seed[0][label][key]]
            ax.plot(x[1:] if label == SCRATCH else x, mean[1:] if label == SCRATCH else mean, style, ms=3,
                    color=plt.cm.tab20(i % 20), label=label)  # from scratch: its step-0 loss (~7.6) would squash the rest
    for ax, xl in zip(axes, ("total training steps", "total active training GFLOPs")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"validation loss, mean of {len(per_seed)} seed(s)")
        lo = min(min(r[k]["losses"]) for r in per_seed for k in r)
        ax.set_ylim(lo - 0.05, lo + 1.2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("sparse upcycling vs dense continued vs MoE from scratch")
    save_png(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense-steps", type=int, default=150, help="steps of the dense model before upcycling")
    ap.add_argument("--steps", type=int, default=100, help="further steps of every continued / upcycled run")
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient of the MoE runs")
    ap.add_argument("--router-z-loss-coef", type=float, default=0.0, help="router z-loss coefficient of the MoE runs")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (every run once per seed)")
    ap.add_argument("--smoke", action="store_true", help="every code path at a tiny size (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/upcycle]")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="no training: tables and plot of a saved result (its complete seeds), beside it")
    args = ap.parse_args()
    if args.report is not None:
        return report(args.report)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.eval_blocks = EVAL_BLOCKS
    max_bytes = None
    if args.smoke:
        max_bytes = SMOKE["max_bytes"]
        for key in ("dense_steps", "steps", "eval_every", "eval_blocks"):
            setattr(args, key, SMOKE[key])
    tok, train_blocks, val_blocks, acc = prepare_run(args, REPO / "benchmarks" / "results" / "upcycle",
                                                     max_bytes=max_bytes)
    name = (f"upcycle-{args.dense_steps}-{args.steps}-seeds{'-'.join(map(str, seeds))}"
            + ("-smoke" if args.smoke else ""))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}

    def save(seed: int, runs: dict) -> None:
        results["seeds"][str(seed)] = runs
        save_json(args.out / f"{name}.json", results)

    work = Path(tempfile.mkdtemp(prefix="bench-upcycle-"))
    try:
        for seed in seeds:
            run_seed(seed, args, tok, train_blocks, val_blocks, acc, work, lambda runs, s=seed: save(s, runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args.out / f"{name}.json")


def report(path: Path) -> None:
    """Tables (printed, and .md) and plot (.png) beside a saved result; a seed cut off part-way is left out."""
    results = json.loads(path.read_text())
    labels = max((set(runs) for runs in results["seeds"].values()), key=len)
    results["seeds"] = {s: runs for s, runs in results["seeds"].items() if set(runs) == labels}
    plot(results, path.with_suffix(".png"))
    text = tables(results)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
