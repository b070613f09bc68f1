"""Growth cost at real size: wall time and peak RSS of `growkit grow` against plain safetensors.

Two cases (random weights, fp32):
  gpt2   GPT-2-small shape (124M parameters, ~500 MB) -> GPT-2-medium shape (hidden 1024, 16 heads, ffn 4096,
         24 layers) with --method net2net --depth-method stack;
  llama  a Llama shape of ~1.2 GB (hidden 1536, ffn 4096, 12 heads / 4 kv heads, 8 layers, vocab 32000, untied)
         grown 2x in width with --method clone.

For each case, three kinds of separate processes, each under /usr/bin/time -v (wall clock and maximum resident set size):
  grow       python -m growkit.cli grow SRC -o OUT ... --quiet
  grow_no_thp  the same with THP_MEM_ALLOC_ENABLE=0 (torch's 4 KiB-page allocations, as before the CLI set it)
  plain      python -c "load_file(every shard of OUT); save_file(the same dict, PLAIN/...)"   (the same output bytes)
  plain+sync the same, then fsync of each written file (growkit fsyncs its shards before the atomic rename)
and reports grow / plain wall-time ratios, and peak RSS against the largest output tensor: the goal is
time <= 1.4x plain and peak RSS <= 1.5 x largest output tensor + 400 MB.

Usage:  python benchmarks/bench_scale.py [gpt2|llama ...] [--work /tmp/growkit-bench] [--keep]
Every multi-GB file lives under --work and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "gpt2": {
        "make": "gpt2",
        "args": ["--hidden", "1024", "--heads", "16", "--ffn", "4096", "--layers", "24", "--method", "net2net",
                 "--depth-method", "stack"],
    },
    "llama": {
        "make": "llama",
        "args": ["--width", "2x", "--method", "clone"],
    },
}

PLAIN = r"""
import os, sys, glob
from safetensors.torch import load_file, save_file
src, dst, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
os.makedirs(dst)
for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
    tensors = load_file(f)
    out = os.path.join(dst, os.path.basename(f))
    save_file(tensors, out, metadata={"format": "pt"})
    del tensors
    if sync:
        fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def make_source(kind: str, path: Path) -> None:
    """A randomly initialised transformers model saved with save_pretrained (a real HF directory)."""
    code = f"""
import torch, transformers as T
torch.manual_seed(0)
if {kind!r} == "gpt2":
    cfg = T.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
else:
    cfg = T.LlamaConfig(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=4,
                        num_hidden_layers=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
with torch.device("cpu"):
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained({str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `cmd` under /usr/bin/time -v; wall seconds, CPU seconds (user + system) and peak RSS in MB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"} | _env() | (env or {}))
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): (\S+)", proc.stderr).group(1)) for k in ("User", "System"))
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(p) for p in elapsed.split(":")]
    wall_time_v = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {"wall_s": round(wall_time_v, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss_kb / 1024, 1)}


def _env() -> dict[str, str]:
    keep = ("HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TMPDIR", "LANG")
    return {k: os.environ[k] for k in keep if k in os.environ}


def largest_tensor_mb(directory: Path) -> tuple[float, float]:
    """(largest tensor, total tensor bytes) of a safetensors directory in MB, read from the headers."""
    largest = total = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = v["data_offsets"][1] - v["data_offsets"][0]
                largest, total = max(largest, size), total + size
    return largest / 2**20, total / 2**20


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def run_case(name: str, work: Path, repeats: int) -> dict[str, object]:
    case = CASES[name]
    src, out, plain, plain_sync = (work / f"{name}-{s}" for s in ("src", "grown", "plain", "plain-sync"))
    for p in (out, plain, plain_sync):
        shutil.rmtree(p, ignore_errors=True)
    if not src.exists():
        make_source(case["make"], src)
    grow_cmd = [sys.executable, "-m", "growkit.cli", "grow", str(src), "-o", str(out), *case["args"], "--quiet"]
    plain_cmd = [sys.executable, "-c", PLAIN, str(out), str(plain), "0"]
    sync_cmd = [sys.executable, "-c", PLAIN, str(out), str(plain_sync), "1"]
    # Warm the page cache with the source, so that neither side pays a cold first read.
    for f in src.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    # Interleaved repeats (grow, plain, plain+sync, grow, ...): the machine is shared, so one run alone can be
    # slowed by a neighbour; medians of `repeats` runs are reported, with every single run in `runs`.
    runs: dict[str, list[dict[str, float]]] = {"grow": [], "grow_no_thp": [], "plain": [], "plain_sync": []}
    no_thp = {"THP_MEM_ALLOC_ENABLE": "0"}  # the CLI turns torch's huge-page allocations on unless told otherwise
    for r in range(repeats):
        for key, cmd, path, env in (("grow", grow_cmd, out, None), ("grow_no_thp", grow_cmd, out, no_thp),
                                    ("plain", plain_cmd, plain, None), ("plain_sync", sync_cmd, plain_sync, None)):
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            runs[key].append(timed(cmd, work / f"{name}-{key}-{r}.log", env))
    g, p, s = (_median(runs[k]) for k in ("grow", "plain", "plain_sync"))
    largest, total = largest_tensor_mb(out)
    src_mb = largest_tensor_mb(src)[1]
    budget = 1.5 * largest + 400
    row = {
        "case": name, "source_mb": round(src_mb), "output_mb": round(total), "largest_output_tensor_mb": round(largest, 1),
        "grow": g, "grow_no_thp": _median(runs["grow_no_thp"]), "plain": p, "plain_sync": s, "runs": runs, "load_average": os.getloadavg(),
        "time_ratio_vs_plain": round(g["wall_s"] / p["wall_s"], 2),
        "time_ratio_vs_plain_sync": round(g["wall_s"] / s["wall_s"], 2),
        "rss_budget_mb": round(budget), "rss_over_budget": round(g["peak_rss_mb"] / budget, 2),
        "rss_over_largest_tensor": round(g["peak_rss_mb"] / largest, 2),
        "commands": {"grow": shlex.join(grow_cmd), "plain": shlex.join(plain_cmd[:2]) + " ...",
                     "plain_sync": "same with fsync"},
    }
    for p_ in (out, plain, plain_sync):
        shutil.rmtree(p_, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/growkit-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated sources under --work")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.cases:
            print(json.dumps(run_case(name, args.work, args.repeats)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
