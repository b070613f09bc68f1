"""Run the shipped recipes end to end and report what each one measured, with wall time and peak memory.

    python benchmarks/bench_recipes.py                 # the two tiny recipes on the bundled models
    python benchmarks/bench_recipes.py --gpt2-medium   # also the GPT-2 small -> medium shape recipe (see below)

Each recipe runs in its own subprocess (`growkit run ...`) so that peak RSS is that run's alone. The GPT-2 medium
recipe needs a GPT-2-small-shaped source; growkit never downloads one, so this script makes one with random
weights (GPT2Config() defaults, seed 0, fp32, no tokenizer, so verification uses random tokens and the recipe's
eval section is switched off with `--set eval=null`). Its figures are about cost at real size (124M -> 355M
parameters), not about quality: stacking layers of a random model does not preserve its function.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path) -> tuple[float, float]:
    """Run `growkit ARGS` from this checkout; return (wall seconds, peak RSS of that child in MiB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "growkit.cli", *args], cwd=cwd, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"growkit {' '.join(args)} failed:\n{log.read()}")
    return wall, usage.ru_maxrss / 1024


def gpt2_small_random(path: Path) -> Path:
    """Made in a subprocess: a parent holding a 124M model would pass its memory high-water mark to every child it
    starts afterwards (Linux keeps ru_maxrss across fork and exec), inflating their peak RSS."""
    code = ("import sys, torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0); "
            "GPT2LMHeadModel(GPT2Config()).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2-medium", action="store_true", help="also run the GPT-2 small -> medium recipe")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = [(name, ["run", str(REPO / "recipes" / f"{name}.yaml"), "-q", "--out", str(work / name)])
                for name in ("tiny-gpt2-width2x", "tiny-llama-width2x-identity-depth")]
        if args.gpt2_medium:
            src = gpt2_small_random(work / "gpt2-small-random")
            jobs.append(("gpt2-small-to-medium", ["run", str(REPO / "recipes" / "gpt2-small-to-medium.yaml"), "-q",
                                                  "--source", str(src), "--set", "eval=null",
                                                  "--out", str(work / "gpt2-medium")]))
        for name, cmd in jobs:
            wall, rss = run(cmd, cwd=work)
            out = Path(cmd[cmd.index("--out") + 1])
            prov = json.loads((out / "growkit.json").read_text())
            v, e = prov.get("verification") or {}, prov.get("evaluation") or {}
            rows.append((name, prov["parameters"], v.get("max_abs_dlogits"), e.get("source_loss"), e.get("loss"),
                         e.get("tokens"), wall, rss))
    print("| recipe | parameters | max abs Δlogits (verify) | eval loss source | eval loss grown | eval tokens "
          "| wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (p_old, p_new), dl, ls, lg, tok, wall, rss in rows:
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"| {name} | {p_old:,} -> {p_new:,} | {fmt(dl, '.2e')} | {fmt(ls, '.4f')} | {fmt(lg, '.4f')} "
              f"| {fmt(tok, ',')} | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
