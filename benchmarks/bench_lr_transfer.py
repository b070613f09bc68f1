"""LR transfer: does the small model's best learning rate stay best for the grown model with µP groups?

    python benchmarks/bench_lr_transfer.py                  # GPT-2 and Llama, 5 LRs, 3 settings each

Four sweeps over the same 5 peak LRs (factor 2 apart), same recipe and block order as bench_speedup:
1. the small model (bundled config: d 64, 2 layers) trained from a fixed random init for S steps;
2. the bundled small model (models/tiny-*, already trained) trained S more steps: the continued-training regime;
3. the bundled small model grown 2x in width (clone + symmetric noise) and trained S steps with µP groups
   (matrices whose fan-in doubled get lr/2);
4. the same grown model trained S steps with one LR for every parameter (standard parametrization).
Transfer means: row 3's optimum sits where row 2's does (same regime, other width). Reported: final validation
loss per LR, and where each optimum lies (log2 distance from row 2's optimum).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from _train_common import REPO, fmt, prepare_run, run, save_json

NOISE_DB = 10.0


def sweep(arch: str, args, acc, train_blocks, val_blocks) -> dict:
    import transformers as T

    import growkit

    bundled = T.AutoModelForCausalLM.from_pretrained(REPO / "models" / f"tiny-{arch}", dtype=torch.float32)
    rows: dict[str, list[float]] = {"small, from init": [], "small, continued": [], "grown 2x, µP": [],
                                    "grown 2x, no µP": []}
    start = {}
    for lr in args.lrs:
        torch.manual_seed(args.seed)
        small = T.AutoModelForCausalLM.from_config(bundled.config)
        c = run(small, "small", train_blocks, val_blocks, steps=args.steps, lr=lr, eval_every=args.steps,
                seed=args.seed, accelerator=acc, batch_size=args.batch)
        rows["small, from init"].append(c.losses[-1])
        cont = T.AutoModelForCausalLM.from_pretrained(REPO / "models" / f"tiny-{arch}", dtype=torch.float32)
        c = run(cont, "small, continued", train_blocks, val_blocks, steps=args.steps, lr=lr, eval_every=args.steps,
                seed=args.seed, accelerator=acc, batch_size=args.batch)
        start["small, continued"] = c.losses[0]
        rows["small, continued"].append(c.losses[-1])
        for label, base in (("grown 2x, µP", bundled.config), ("grown 2x, no µP", None)):
            grown = growkit.grow_model(bundled, width=2, method="clone", noise_snr_db=NOISE_DB, seed=args.seed)
            c = run(grown, label, train_blocks, val_blocks, steps=args.steps, lr=lr, eval_every=args.steps,
                    seed=args.seed, accelerator=acc, base_config=base, batch_size=args.batch)
            start[label] = c.losses[0]
            rows[label].append(c.losses[-1])
        print(f"[{arch}] lr {lr:g}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items()), flush=True)
    best = {k: args.lrs[min(range(len(v)), key=lambda i: v[i] if math.isfinite(v[i]) else float("inf"))]
            for k, v in rows.items()}
    return {"arch": arch, "lrs": args.lrs, "rows": rows, "best": best, "grown_start_loss": start}


def table(res: dict, steps: int) -> str:
    lrs = res["lrs"]
    ref = res["best"]["small, continued"]
    head = "| setting | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | log2 shift vs small, continued |"
    lines = [f"**{res['arch']}** (final val loss after {steps} steps; the bundled small model starts at "
             f"{res['grown_start_loss']['small, continued']:.4f}, the grown one at "
             f"{res['grown_start_loss']['grown 2x, µP']:.4f})\n", head, "|---" * (len(lrs) + 3) + "|"]
    for k, v in res["rows"].items():
        bi = lrs.index(res["best"][k])
        cells = [("**" + fmt(x, ".4f") + "**") if i == bi else fmt(x, ".4f") for i, x in enumerate(v)]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {res['best'][k]:g} | {math.log2(res['best'][k] / ref):+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--steps", type=int, default=300, help="steps per run (small from init; grown after growth)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/lr-transfer-<archs>]")
    args = ap.parse_args()
    default_out = REPO / "benchmarks" / "results" / f"lr-transfer-{'-'.join(args.arch)}"
    t0 = time.time()
    _, train_blocks, val_blocks, acc = prepare_run(args, default_out)
    results = [sweep(a, args, acc, train_blocks, val_blocks) for a in args.arch]
    cmd = (f"python benchmarks/bench_lr_transfer.py --arch {' '.join(args.arch)} --steps {args.steps} "
           f"--lrs {' '.join(f'{x:g}' for x in args.lrs)} --batch {args.batch} --seed {args.seed} --threads {args.threads}"
           + (f" --out {args.out}" if args.out != default_out else ""))
    md = "\n".join(table(r, args.steps) for r in results)
    save_json(args.out / "lr_transfer.json", {"command": cmd, "torch": torch.__version__,
                                              "python": platform.python_version(), "seconds": round(time.time() - t0),
                                              "results": results})
    (args.out / "lr_transfer.md").write_text(f"`{cmd}` ({time.time() - t0:.0f} s)\n\n{md}")
    print(f"\n`{cmd}` ({time.time() - t0:.0f} s)\n\n{md}")


if __name__ == "__main__":
    main()
