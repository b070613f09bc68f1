"""Growth vs scratch: how many steps does a grown model need to reach what scratch reaches in N steps?

    python benchmarks/bench_speedup.py                       # both families, every growth operator on main
    python benchmarks/bench_speedup.py --arch gpt2 --steps 600  # quicker look

Protocol (DESIGN.md section 5.2): a small model with the bundled architecture (models/tiny-*: d 64, 2 layers) is
trained from a seeded init for S steps on the stdlib train split; it is grown 2x in width by every width operator
on main and 2x in depth by `stack` and `identity`; the same-size model from scratch (seed 0) trains N steps. Every
run uses the same recipe (AdamW 0.9/0.95, wd 0.1, warm-up 5%, cosine to 10%, batch B x 128, clip 1.0), the same
block order and the same 128 validation blocks. Grown runs use µP groups relative to the small model (the LR is
the small model's), read the block stream on from where the small model stopped (no block twice), and stop once
they reach scratch's final validation loss. Compute is 6N + 6LTd FLOPs per token (embedding lookups excluded).

--protocol continue (default): one N-step schedule; the small model trains its first S steps, the grown model
    continues the same schedule from step S (`growkit train --start-step S`).
--protocol restart: the small model trains S steps under its own complete schedule; the grown model starts an
    N-step schedule of its own (warm-up again).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from _train_common import REPO, SEQ, Curve, flops_per_token, fmt, prepare_run, run, save_json, save_png

RESULTS = REPO / "benchmarks" / "results"
NOISE_DB = (10.0, 0.0)  # symmetric noise at 10 dB below the weight std (0.32 x std) and at the std, DESIGN.md 2


def width_variants() -> list[tuple[str, dict]]:
    from growkit.operators import OPERATORS

    out = [("clone", dict(method="clone"))]
    out += [(f"clone+noise {db:g} dB", dict(method="clone", noise_snr_db=db)) for db in NOISE_DB]
    for name in sorted(OPERATORS):
        if name not in ("clone", "subclone", "select"):
            out.append((name, dict(method=name)))
    return out


def depth_variants() -> list[tuple[str, dict]]:
    return [("depth stack", dict(depth_method="stack")), ("depth identity", dict(depth_method="identity"))]


def bench_family(arch: str, args, acc, tok, train_blocks, val_blocks) -> dict:
    import transformers as T

    import growkit

    bundled_cfg = T.AutoConfig.from_pretrained(REPO / "models" / f"tiny-{arch}")
    torch.manual_seed(args.seed)
    small = T.AutoModelForCausalLM.from_config(bundled_cfg)
    cont = args.protocol == "continue"
    if cont and not (0 < args.small_steps < args.steps and args.small_steps % args.eval_every == 0):
        raise SystemExit("--protocol continue needs 0 < --small-steps < --steps, a multiple of --eval-every")
    # continue: the small model runs the first S steps of the N-step schedule; restart: a complete S-step schedule.
    small_curve = run(small, "small", train_blocks, val_blocks, steps=args.steps if cont else args.small_steps,
                      lr=args.lr, eval_every=args.eval_every, seed=args.seed, accelerator=acc, batch_size=args.batch,
                      **(dict(stop_after=args.small_steps) if cont else {}))
    # The grown model reads on where the small model stopped; `continue` also resumes the small model's schedule.
    grown_schedule = dict(start_step=args.small_steps) if cont else dict(data_start=args.small_steps)
    small_loss = small_curve.losses[-1]
    tokens_per_step = args.batch * SEQ
    small_flops = args.small_steps * tokens_per_step * flops_per_token(small.config, SEQ)
    print(f"[{arch}] small model: {args.small_steps} steps -> val loss {small_loss:.4f} "
          f"({small_flops:.3g} FLOPs, {small_curve.seconds:.0f}s)", flush=True)
    # Control: the small model trained on without growth, under the grown runs' schedule and data. Where it reaches
    # scratch's loss too, the larger model is not worth its cost at this budget and a speed-up says little.
    control = run(copy.deepcopy(small), "small, no growth", train_blocks, val_blocks, steps=args.steps, lr=args.lr,
                  eval_every=args.eval_every, seed=args.seed, accelerator=acc, batch_size=args.batch, **grown_schedule)
    print(f"[{arch}] control, small model without growth: {control.losses[-1]:.4f} after {control.completed} steps",
          flush=True)
    result = {"arch": arch, "protocol": args.protocol, "small_val_loss": small_loss, "small_flops": small_flops,
              "control": control.as_dict(),
              "small_steps": args.small_steps, "tokens_per_step": tokens_per_step,
              "small_seconds": round(small_curve.seconds, 1), "small_curve": small_curve.as_dict(), "groups": []}

    kinds = {"width": ("width 2x", width_variants(), dict(width=2)),
             "depth": ("depth 2x", depth_variants(), dict(layers="2x"))}
    for kind, variants, grow_kw in (kinds[k] for k in args.kinds):
        target_cfg = growkit.grow_model(small, **grow_kw).config
        torch.manual_seed(args.seed)
        scratch_model = T.AutoModelForCausalLM.from_config(target_cfg)
        big_fpt = flops_per_token(target_cfg, SEQ)
        scratch = run(scratch_model, f"scratch ({kind})", train_blocks, val_blocks, steps=args.steps, lr=args.lr,
                      eval_every=args.eval_every, seed=args.seed, accelerator=acc, batch_size=args.batch)
        target = scratch.losses[-1]
        print(f"[{arch}] {kind} scratch: {args.steps} steps -> val {target:.4f} ({scratch.seconds:.0f}s); "
              f"small model {small_loss:.4f}{'' if target < small_loss else '  (scratch did NOT beat the small model)'}",
              flush=True)
        group = {"kind": kind, "params": sum(p.numel() for p in scratch_model.parameters()), "flops_per_token": big_fpt,
                 "scratch": scratch.as_dict(), "target": target, "rows": []}
        del scratch_model
        for label, kw in variants:
            if args.operators and label not in args.operators:
                continue
            grown = growkit.grow_model(small, **grow_kw, **kw, seed=args.seed)
            curve = run(grown, label, train_blocks, val_blocks, steps=args.steps, lr=args.lr,
                        eval_every=args.eval_every, seed=args.seed, accelerator=acc, base_config=small.config,
                        stop_below=target, batch_size=args.batch, **grown_schedule)
            reach = curve.first_step_at_or_below(target)
            speedup = args.steps / reach if reach else None  # reach 0: scratch never beat the grown start
            scratch_flops = args.steps * tokens_per_step * big_fpt
            total = (reach * tokens_per_step * big_fpt + small_flops) if reach is not None else None
            row = {"operator": label, "loss_after_growth": curve.losses[0], "steps_to_target": reach,
                   "speedup": speedup, "speedup_with_small": scratch_flops / total if total else None,
                   "best_loss": min(curve.losses), "steps_run": curve.completed, "seconds": round(curve.seconds, 1),
                   "curve": curve.as_dict()}
            group["rows"].append(row)
            print(f"[{arch}] {kind} {label}: after growth {curve.losses[0]:.4f}, reach {fmt(reach, '.0f')} steps, "
                  f"speed-up {ratio(speedup)}, counting small {ratio(row['speedup_with_small'])} "
                  f"({curve.seconds:.0f}s)", flush=True)
            del grown
        if kind.startswith("width") and args.budgets and not cont:
            # Budget-matched check: the grown model gets its own complete schedule of f*N steps (warm-up, cosine
            # decay), as a user would run it. If it ends at or below scratch's N-step loss, speed-up >= 1/f.
            label, kw = variants[1]  # clone + noise, the operator meant for training
            for frac in args.budgets:
                steps = max(1, round(frac * args.steps))
                grown = growkit.grow_model(small, **grow_kw, **kw, seed=args.seed)
                curve = run(grown, f"{label}, own {steps}-step schedule", train_blocks, val_blocks, steps=steps,
                            lr=args.lr, eval_every=args.eval_every, seed=args.seed, accelerator=acc,
                            base_config=small.config, batch_size=args.batch, data_start=args.small_steps)
                total = steps * tokens_per_step * big_fpt + small_flops
                group.setdefault("budget_rows", []).append({
                    "operator": label, "fraction": frac, "steps": steps, "final_loss": curve.losses[-1],
                    "reaches_target": curve.losses[-1] <= target, "ratio_if_reached": 1 / frac,
                    "ratio_with_small_if_reached": args.steps * tokens_per_step * big_fpt / total,
                    "seconds": round(curve.seconds, 1), "curve": curve.as_dict()})
                print(f"[{arch}] {kind} {label} with its own {steps}-step schedule: final {curve.losses[-1]:.4f} "
                      f"vs scratch {target:.4f} ({curve.seconds:.0f}s)", flush=True)
                del grown
        result["groups"].append(group)
    return result


def ratio(x: float | None) -> str:
    text = fmt(x, ".2f")
    return text if text == "n/a" else text + "x"


def report(doc: dict, steps: int) -> str:
    """The markdown of a run: its command and time, then every table."""
    return f"`{doc['command']}` ({doc['seconds']} s)\n\n" + "\n".join(table(r, steps) for r in doc["results"])


def small_flops_ratio(res: dict, g: dict) -> float:
    return g["flops_per_token"] / (res["small_flops"] / (res["small_steps"] * res["tokens_per_step"]))


def table(res: dict, steps: int) -> str:
    lines = []
    for g in res["groups"]:
        lines.append(f"**{res['arch']} {g['kind']}, protocol {res['protocol']}** ({g['params']:,} params): small model "
                     f"val loss {res['small_val_loss']:.4f} after {res['small_steps']} steps; scratch after {steps} steps "
                     f"{g['target']:.4f}"
                     f"{'' if g['target'] < res['small_val_loss'] else ' (does not beat the small model)'}\n")
        c = res["control"]
        c_reach = Curve(**{k: c[k] for k in ("label", "steps", "losses")}).first_step_at_or_below(g["target"])
        lines.append(f"Control, the small model trained on without growth (same schedule and data): "
                     f"{c['losses'][-1]:.4f} after the {steps}-step budget; "
                     + (f"it reaches scratch's final loss {c_reach:.0f} steps after the growth point, at "
                        f"{small_flops_ratio(res, g):.2f}x less compute per step: at this budget scratch's size is not "
                        "worth its cost and the speed-ups below overstate growth's value.\n"
                        if c_reach is not None else "it does not reach scratch's final loss.\n"))
        lines.append("| operator | val loss after growth | steps to scratch's final loss | speed-up (large phase) "
                     "| speed-up counting small-model FLOPs | best val loss seen | wall s |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in g["rows"]:
            budget = steps - res["small_steps"] if res["protocol"] == "continue" else steps
            reach = fmt(r["steps_to_target"], ".0f") if r["steps_to_target"] is not None else f"not reached in {budget}"
            lines.append(f"| {r['operator']} | {r['loss_after_growth']:.4f} | {reach} | {ratio(r['speedup'])} | "
                         f"{ratio(r['speedup_with_small'])} | {r['best_loss']:.4f} | {r['seconds']:.0f} |")
        if g.get("budget_rows"):
            lines.append("\nBudget-matched (the grown model trained with its own complete schedule of f x N steps):\n")
            lines.append("| operator | steps (f x N) | final val loss | scratch's N-step loss | reached? | speed-up if reached "
                         "| counting small-model FLOPs |")
            lines.append("|---|---|---|---|---|---|---|")
            for b in g["budget_rows"]:
                lines.append(f"| {b['operator']} | {b['steps']} ({b['fraction']:g} N) | {b['final_loss']:.4f} | "
                             f"{g['target']:.4f} | {'yes' if b['reaches_target'] else 'no'} | "
                             f"{b['ratio_if_reached']:.2f}x | {b['ratio_with_small_if_reached']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(r, g) for r in results for g in r["groups"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), dpi=100, squeeze=False)
    for ax, (r, g) in zip(axes[0], groups):
        s = g["scratch"]
        ax.plot(s["steps"], s["losses"], "k-", lw=2, label="scratch")
        for row in g["rows"]:
            c = row["curve"]
            ax.plot(c["steps"], c["losses"], lw=1.3, label=row["operator"])
        ax.axhline(r["small_val_loss"], color="gray", ls=":", label="small model")
        ax.axhline(g["target"], color="k", ls="--", lw=0.8)
        ax.set_title(f"{r['arch']} {g['kind']}")
        ax.set_xlabel("steps after growth")
        ax.set_ylabel("validation loss")
        lo = min(min(g["scratch"]["losses"]), *(min(x["curve"]["losses"]) for x in g["rows"]))
        ax.set_ylim(lo - 0.05, r["small_val_loss"] + 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--steps", type=int, default=800, help="scratch steps N (also the grown runs' cap)")
    ap.add_argument("--small-steps", type=int, default=400, help="steps S of the small model before growth")
    ap.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--protocol", choices=["continue", "restart"], default="continue",
                    help="continue: the grown model continues the small model's N-step schedule from step S; restart: "
                         "the small model has its own S-step schedule, the grown model a new N-step one")
    ap.add_argument("--kinds", nargs="+", default=["width", "depth"], choices=["width", "depth"])
    ap.add_argument("--operators", nargs="*", default=None, help="only these rows (labels as in the table)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25],
                    help="fractions f of N for budget-matched clone+noise runs with their own schedule (restart only)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak LR (the small models' LR; µP scales grown matrices)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/speedup-<archs>]")
    ap.add_argument("--render", type=Path, default=None, help="only print the tables of an earlier run's speedup.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(report(saved, int(saved["command"].split("--steps ")[1].split()[0])))
        return
    default_out = RESULTS / f"speedup-{'-'.join(args.arch)}-{args.protocol}"
    t0 = time.time()
    tok, train_blocks, val_blocks, acc = prepare_run(args, default_out)
    results = [bench_family(a, args, acc, tok, train_blocks, val_blocks) for a in args.arch]
    cmd = "python benchmarks/bench_speedup.py " + " ".join(
        [f"--arch {' '.join(args.arch)}", f"--protocol {args.protocol}", f"--steps {args.steps}",
         f"--small-steps {args.small_steps}",
         f"--batch {args.batch}", f"--lr {args.lr:g}", f"--eval-every {args.eval_every}", f"--seed {args.seed}",
         f"--threads {args.threads}"]
        + ([f"--kinds {' '.join(args.kinds)}"] if args.kinds != ["width", "depth"] else [])
        + ([f"--operators {' '.join(repr(o) if ' ' in o else o for o in args.operators)}"] if args.operators else [])
        + ([f"--budgets {' '.join(f'{b:g}' for b in args.budgets)}"] if args.budgets != [0.5, 0.25] else [])
        + ([f"--out {args.out}"] if args.out != default_out else []))
    doc = {"command": cmd, "torch": torch.__version__, "python": platform.python_version(),
           "seconds": round(time.time() - t0), "results": results}
    save_json(args.out / "speedup.json", doc)
    plot(results, args.out / "speedup.png")
    md = report(doc, args.steps)
    (args.out / "speedup.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
