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

Presets: `cpu` (the default) is the protocol above with the bundled tiny models; `gpu` is the same protocol with
wider and deeper models and 8x the tokens per step, in bf16 on one accelerator:

    python benchmarks/bench_progressive.py --preset gpu            # --device cuda (the gpu preset's default)

It prints its FLOPs plan and a time estimate before training (`plan`). `--smoke` runs any preset's code path (its
device and precision) at a size that finishes in seconds on a CPU, e.g. `--preset gpu --smoke --device cpu`: a
check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from _train_common import EVAL_BLOCKS, REPO, SEQ, flops_per_token, fmt, prepare_run, run, save_json

RESULTS = REPO / "benchmarks" / "results"
NOISE_DB = 10.0
FRACTIONS = (0.1, 0.25, 0.5)
METHODS = ("control", "carried", "fresh")


@dataclass(frozen=True)
class Preset:
    """One protocol's sizes: config overrides of the bundled tiny models per family (none: as bundled), the
    schedule's steps, sequences per step, evaluation cadence and size, device, precision, and how much of the
    stdlib corpus to read ((train, val) bytes; None: all of it)."""

    sizes: dict[str, dict] = field(default_factory=dict)
    steps: int = 800
    batch: int = 8
    eval_every: int = 25
    eval_blocks: int = EVAL_BLOCKS
    device: str = "cpu"
    precision: str = "no"
    max_bytes: tuple[int, int] | None = None


PRESETS = {
    "cpu": Preset(),
    # 4 layers, hidden 256 -> 512 (head_dim 64, FFN ~2.75x / 4x), 64 x 128 tokens a step: 6.6M tokens in 800 steps,
    # 1.9 passes over the stdlib train split (3.5M tokens).
    "gpu": Preset(sizes={"llama": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=64, num_hidden_layers=4),
                         "gpt2": dict(n_embd=256, n_inner=1024, n_head=4, n_layer=4)},
                  batch=64, device="cuda", precision="bf16"),
}
#: `--smoke`: a preset's code path at a size that runs in seconds on a CPU (growth points at steps 2, 4 and 8).
SMOKE = dict(sizes={"llama": dict(hidden_size=32, intermediate_size=88, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=16, num_hidden_layers=2),
                    "gpt2": dict(n_embd=32, n_inner=128, n_head=2, n_layer=2)},
             steps=16, batch=2, eval_every=2, eval_blocks=8, max_bytes=(300_000, 60_000))

#: The time estimate's assumptions for one H200-class GPU: sustained bf16 throughput on these small matrices (an
#: eighth of the ~790 TFLOP/s dense peak), and a fixed cost per optimizer step (an eager transformers model's kernel
#: launches and Python: forward, backward, clip and a per-tensor-group AdamW, about 1,000 launches).
ASSUMED_FLOPS_PER_S = 100e12
ASSUMED_SECONDS_PER_STEP = 0.012


def model_config(arch: str, preset: Preset):
    """The small model's config: the bundled tiny model's, resized as the preset says."""
    import transformers as T

    config = T.AutoConfig.from_pretrained(REPO / "models" / f"tiny-{arch}")
    for key, value in preset.sizes.get(arch, {}).items():
        setattr(config, key, value)
    return config


def plan(archs: list[str], preset: Preset, fractions: list[float], methods: list[str]) -> dict:
    """Worst-case work of a run (every run to the schedule's end, none stopping at the target): training and
    evaluation FLOPs, optimizer steps, and the time that would take under the assumptions above."""
    from growkit.pipeline import growth_of_model

    flops = evals = 0.0
    steps = 0
    tokens = preset.batch * SEQ
    n = preset.steps
    for arch in archs:
        config = model_config(arch, preset)
        small = flops_per_token(config, SEQ)
        big = flops_per_token(growth_of_model(_empty(config), width=2).config, SEQ)  # the plan, on shapes alone
        runs = [(0, n)] + [(n, 0)] * ("control" in methods)  # (small steps, large steps)
        for frac in fractions:
            at = grow_step(frac, preset)
            runs += [(at, n - at)] * sum(m in methods for m in ("carried", "fresh"))
        for small_steps, big_steps in runs:
            flops += (small_steps * small + big_steps * big) * tokens
            evals += (n // preset.eval_every + 2) * preset.eval_blocks * SEQ * big / 3  # forward only, large size
            steps += small_steps + big_steps
    seconds = (flops + evals) / ASSUMED_FLOPS_PER_S + steps * ASSUMED_SECONDS_PER_STEP
    return {"train_flops": flops, "eval_flops": evals, "optimizer_steps": steps, "estimated_seconds": seconds,
            "assumed_flops_per_s": ASSUMED_FLOPS_PER_S, "assumed_seconds_per_step": ASSUMED_SECONDS_PER_STEP}


def _empty(config):
    import transformers as T

    with torch.device("meta"):
        return T.AutoModelForCausalLM.from_config(config)


def grow_step(frac: float, preset: Preset) -> int:
    """A growth point: the fraction of the schedule, on an evaluation step."""
    return round(frac * preset.steps / preset.eval_every) * preset.eval_every


def bench_family(arch: str, args, acc, train_blocks, val_blocks) -> dict:
    import transformers as T

    import growkit
    from growkit.pipeline import growth_of_model, grown_model

    common = dict(steps=args.steps, lr=args.lr, eval_every=args.eval_every, seed=args.seed, accelerator=acc,
                  batch_size=args.batch, eval_blocks=args.preset.eval_blocks)
    config = model_config(arch, args.preset)

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
        at = grow_step(frac, args.preset)
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
        # The grown model is made on the CPU; `run` moves it to the device.
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


def device_and_accelerator(ap: argparse.ArgumentParser, device: str, precision: str):
    """`--device` resolved ('auto': CUDA when visible) and an Accelerator on it with the preset's precision."""
    from accelerate import Accelerator

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible here (--device cpu, or --smoke --device cpu to check the "
                 "script)")
    return device, Accelerator(cpu=device == "cpu", mixed_precision=precision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: the bundled tiny models (RESULTS.md's protocol); gpu: wider, deeper, 8x the batch, bf16")
    ap.add_argument("--smoke", action="store_true", help="the preset's code path at a tiny size (seconds on a CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None, help="[default: the preset's]")
    ap.add_argument("--arch", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    ap.add_argument("--steps", type=int, default=None, help="the schedule's steps N (scratch's and every run's cap) "
                    "[default: the preset's]")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="growth points, x N")
    ap.add_argument("--batch", type=int, default=None, help="sequences of 128 tokens per step [default: the preset's]")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=None, help="[default: the preset's]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which runs besides scratch")
    ap.add_argument("--target", type=float, default=None,
                    help="scratch's final loss from an earlier run with the same settings (skips the scratch run)")
    ap.add_argument("--untie-head", action="store_true", help="untie a tied head at growth (both grown paths)")
    ap.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/progressive-<archs>, "
                    "with -<preset> for other presets than cpu]")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    if args.smoke:
        preset = replace(preset, **SMOKE)
    preset = replace(preset, **{k: v for k, v in (("steps", args.steps), ("batch", args.batch),
                                                   ("eval_every", args.eval_every)) if v is not None})
    args.preset_name, args.preset = args.preset, preset
    args.steps, args.batch, args.eval_every = preset.steps, preset.batch, preset.eval_every
    device, acc = device_and_accelerator(ap, args.device or preset.device, preset.precision)
    name = args.preset_name + ("-smoke" if args.smoke else "")
    default_out = RESULTS / f"progressive-{'-'.join(args.arch)}{'' if name == 'cpu' else '-' + name}"
    work = plan(args.arch, preset, args.fractions, args.methods)
    print(f"plan: {work['train_flops']:.3g} training + {work['eval_flops']:.3g} evaluation FLOPs, "
          f"{work['optimizer_steps']:,} optimizer steps at most (every run to step {preset.steps}); on one H200-class "
          f"GPU at {ASSUMED_FLOPS_PER_S / 1e12:.0f} TFLOP/s and {ASSUMED_SECONDS_PER_STEP * 1e3:.0f} ms a step: "
          f"~{work['estimated_seconds'] / 60:.1f} min", flush=True)
    t0 = time.time()
    _, train_blocks, val_blocks, acc = prepare_run(args, default_out, acc, preset.max_bytes)
    results = [bench_family(a, args, acc, train_blocks, val_blocks) for a in args.arch]
    cmd = ("python benchmarks/bench_progressive.py "
           + (f"--preset {args.preset_name} " if args.preset_name != "cpu" else "")
           + ("--smoke " if args.smoke else "")
           + (f"--device {args.device} " if args.device else "")
           + f"--arch {' '.join(args.arch)} --steps {args.steps} "
           f"--fractions {' '.join(f'{f:g}' for f in args.fractions)} --batch {args.batch} --lr {args.lr:g} "
           f"--eval-every {args.eval_every} --seed {args.seed} --threads {args.threads}"
           + (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "")
           + (f" --target {args.target:g}" if args.target is not None else "")
           + (" --untie-head" if args.untie_head else "")
           + (f" --out {args.out}" if args.out != default_out else ""))
    doc = {"command": cmd, "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "precision": str(acc.mixed_precision),
           "plan": work, "seconds": round(time.time() - t0), "results": results}
    save_json(args.out / "progressive.json", doc)
    md = f"`{cmd}` ({doc['seconds']} s on {doc['device']})\n\n" + "\n".join(table(r, args.steps) for r in results)
    (args.out / "progressive.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
