"""Progressive growth inside one run: does carrying the optimizer state across growth save compute?

    python benchmarks/bench_progressive.py --arch gpt2 --threads 1

Protocol (the `continue` protocol of RESULTS.md, one N-step schedule: warm-up 5%, cosine to 10%, AdamW 0.9/0.95,
wd 0.1, clip 1.0, batch B x 128, the same block order and the same 128 validation blocks for every run):
- scratch: the 2x-width model trained N steps from a seeded init; its final validation loss is the target;
- control: the small model (the bundled architecture, seeded init) trained the whole N steps without growth;
- carried: the small model trained in one run with `--grow-at S:width=2x` (clone + 10 dB symmetric noise, the
  AdamW state and the schedule carried through the growth), for S at each fraction of N;
- fresh: today's path at the same S: the small model stops after S steps, is grown the same way, and continues the
  schedule from step S with a new AdamW and µP groups (`growkit train --start-step S`).
Grown runs stop once they reach the target. Compute is 6N + 6LTd training FLOPs per token (embedding lookups
excluded), counting the small phase; the ratio is scratch's FLOPs over the run's FLOPs to reach the target.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from _train_common import REPO, SEQ, flops_per_token, fmt, prepare_run, run, save_json

RESULTS = REPO / "benchmarks" / "results"
NOISE_DB = 10.0


def bench_family(arch: str, args, acc, train_blocks, val_blocks) -> dict:
    import transformers as T

    import growkit
    from growkit.pipeline import growth_of_model, grown_model

    common = dict(steps=args.steps, lr=args.lr, eval_every=args.eval_every, seed=args.seed, accelerator=acc,
                  batch_size=args.batch)
    config = T.AutoConfig.from_pretrained(REPO / "models" / f"tiny-{arch}")

    def small_model():
        torch.manual_seed(args.seed)
        return T.AutoModelForCausalLM.from_config(config)

    big_config = growkit.grow_model(small_model(), width=2).config
    scratch = None
    if args.target is None:
        torch.manual_seed(args.seed)
        scratch = run(T.AutoModelForCausalLM.from_config(big_config), "scratch", train_blocks, val_blocks, **common)
        print(f"[{arch}] scratch: {scratch.losses[-1]:.4f} after {args.steps} steps ({scratch.seconds:.0f}s)",
              flush=True)
    target = args.target if scratch is None else scratch.losses[-1]
    tokens = args.batch * SEQ
    small_fpt, big_fpt = flops_per_token(config, SEQ), flops_per_token(big_config, SEQ)
    scratch_flops = args.steps * tokens * big_fpt
    rows = []
    if "control" in args.methods:
        control = run(small_model(), "control", train_blocks, val_blocks, **common)
        c_reach = control.first_step_at_or_below(target)
        rows.append({"method": "control (small, no growth)", "grow_at": None, "reach": c_reach,
                     "flops": None if c_reach is None else c_reach * tokens * small_fpt, "final": control.losses[-1],
                     "seconds": round(control.seconds, 1), "curve": control.as_dict()})
        print(f"[{arch}] control: {control.losses[-1]:.4f}, reach {fmt(c_reach, '.0f')} ({control.seconds:.0f}s)",
              flush=True)
    for frac in args.fractions:
        at = round(frac * args.steps / args.eval_every) * args.eval_every
        if "carried" in args.methods:
            carried = run(small_model(), f"carried @{at}", train_blocks, val_blocks, stop_below=target,
                          grow_at=[f"{at}:width=2x,noise={NOISE_DB:g}{',untie-head=yes' if args.untie_head else ''}"],
                          **common)
            reach = carried.first_step_at_or_below(target)
            # The curve's steps are the run's global steps; before `at` each step costs a small model's FLOPs.
            flops = None if reach is None else (min(reach, at) * small_fpt + max(0.0, reach - at) * big_fpt) * tokens
            rows.append({"method": "carried state (--grow-at)", "grow_at": at, "reach": reach, "flops": flops,
                         "final": carried.losses[-1], "seconds": round(carried.seconds, 1),
                         "curve": carried.as_dict()})
            report_row(arch, rows[-1], scratch_flops)
        if "fresh" not in args.methods:
            continue
        small = small_model()
        run(small, f"small to {at}", train_blocks, val_blocks, stop_after=at, **common)
        grown = grown_model(growth_of_model(small, width=2, noise_snr_db=NOISE_DB, seed=args.seed,
                                            untie_head=args.untie_head))
        fresh = run(grown, f"fresh @{at}", train_blocks, val_blocks, base_config=copy.deepcopy(small.config),
                    stop_below=target, start_step=at, **common)
        f_reach = fresh.first_step_at_or_below(target)  # steps after the growth point
        f_flops = None if f_reach is None else (at * small_fpt + f_reach * big_fpt) * tokens
        rows.append({"method": "fresh AdamW (grow, then train)", "grow_at": at,
                     "reach": None if f_reach is None else at + f_reach, "flops": f_flops, "final": fresh.losses[-1],
                     "seconds": round(fresh.seconds, 1), "curve": fresh.as_dict()})
        report_row(arch, rows[-1], scratch_flops)
    for r in rows:
        r["ratio"] = None if r["flops"] is None else scratch_flops / r["flops"]
    return {"arch": arch, "target": target, "scratch": scratch and scratch.as_dict(), "scratch_flops": scratch_flops,
            "small_flops_per_token": small_fpt, "big_flops_per_token": big_fpt, "rows": rows}


def report_row(arch: str, row: dict, scratch_flops: float) -> None:
    print(f"[{arch}] {row['method']} at {row['grow_at']}: reach {fmt(row['reach'], '.0f')}, "
          f"ratio {ratio(scratch_flops, row['flops'])}, last val {row['final']:.4f} ({row['seconds']:.0f}s)", flush=True)


def ratio(scratch_flops: float, flops: float | None) -> str:
    return "n/a" if flops is None else f"{scratch_flops / flops:.2f}x"


def table(res: dict, steps: int) -> str:
    lines = [f"**{res['arch']} width 2x**: scratch's val loss after {steps} steps {res['target']:.4f} "
             f"({res['scratch_flops']:.3g} FLOPs); a small-model step costs "
             f"{res['big_flops_per_token'] / res['small_flops_per_token']:.2f}x less than a large one\n",
             "| method | growth at step | step reaching scratch's final loss | FLOPs to reach it | scratch FLOPs / "
             "FLOPs | last val loss | wall s |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        reach = fmt(r["reach"], ".0f") if r["reach"] is not None else f"not reached in {steps}"
        flops = "n/a" if r["flops"] is None else f"{r['flops']:.3g}"
        lines.append(f"| {r['method']} | {r['grow_at'] if r['grow_at'] is not None else '-'} | {reach} | {flops} | "
                     f"{fmt(r['ratio'], '.2f')}{'x' if r['ratio'] else ''} | {r['final']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--steps", type=int, default=800, help="the schedule's steps N (scratch's and every run's cap)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="growth points, x N")
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["control", "carried", "fresh"],
                    choices=["control", "carried", "fresh"], help="which runs besides scratch")
    ap.add_argument("--target", type=float, default=None,
                    help="scratch's final loss from an earlier run with the same settings (skips the scratch run)")
    ap.add_argument("--untie-head", action="store_true", help="untie a tied head at growth (both grown paths)")
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/progressive-<archs>]")
    args = ap.parse_args()
    default_out = RESULTS / f"progressive-{'-'.join(args.arch)}"
    t0 = time.time()
    _, train_blocks, val_blocks, acc = prepare_run(args, default_out)
    results = [bench_family(a, args, acc, train_blocks, val_blocks) for a in args.arch]
    cmd = ("python benchmarks/bench_progressive.py " + f"--arch {' '.join(args.arch)} --steps {args.steps} "
           f"--fractions {' '.join(f'{f:g}' for f in args.fractions)} --batch {args.batch} --lr {args.lr:g} "
           f"--eval-every {args.eval_every} --seed {args.seed} --threads {args.threads}"
           + (f" --methods {' '.join(args.methods)}" if args.methods != ["control", "carried", "fresh"] else "")
           + (f" --target {args.target:g}" if args.target is not None else "")
           + (" --untie-head" if args.untie_head else "")
           + (f" --out {args.out}" if args.out != default_out else ""))
    doc = {"command": cmd, "torch": torch.__version__, "python": platform.python_version(),
           "seconds": round(time.time() - t0), "results": results}
    save_json(args.out / "progressive.json", doc)
    md = f"`{cmd}` ({doc['seconds']} s)\n\n" + "\n".join(table(r, args.steps) for r in results)
    (args.out / "progressive.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
