"""Streaming: growing holds about one source and one output tensor at a time, never the checkpoint.

A Llama-shaped checkpoint of 12 layers (39 MB) is grown 2x (149 MB out) in a fresh process; the rise of its peak
resident memory over what it held after imports and a warm-up growth of a tiny checkpoint must stay within 2.5x the
largest output tensor + 8 MB (measured: 12.5 MB over an 8 MB largest tensor). Holding the output (149 MB) or keeping
the source's pages mapped (39 MB; the memory-mapped reader this replaced rose 64 MB) would each break it. The
full-size figures (GPT-2 small -> medium, a 1.2 GB Llama 2x) are in benchmarks/RESULTS.md (bench_scale.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch
import transformers as T

from cli_util import cli_env
from conftest import save_tiny

SCRIPT = """
import json, sys
import torch
from growkit import grow
from growkit.checkpoint.reader import load_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

grow(sys.argv[3], sys.argv[2] + "-warmup", width="2x", quiet=True)  # lazy imports (model card, ...) happen here
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size: imports' own peak must not count
before = status("VmRSS")
result = grow(sys.argv[1], sys.argv[2], width="2x", quiet=True)
peak = status("VmHWM")
out = load_checkpoint(result.out_dir)
sizes = [torch.Size(out.shape(n)).numel() * out.dtype(n).itemsize for n in out.names()]
print(json.dumps({"before_kb": before, "peak_kb": peak, "largest": max(sizes), "total": sum(sizes)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_memory_stays_near_one_tensor(tmp_path):
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=12, vocab_size=4096, max_position_embeddings=128)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    save_tiny("llama-mha", tmp_path / "tiny")
    args = [str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "tiny")]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 2**20
    rise = (m["peak_kb"] - m["before_kb"]) * 1024
    assert m["total"] > 120 * mb  # the test means something only if the output dwarfs one tensor
    print(f"rise {rise / mb:.1f} MB, largest output tensor {m['largest'] / mb:.1f} MB, output {m['total'] / mb:.0f} MB")
    assert rise <= 2.5 * m["largest"] + 8 * mb, (
        f"peak RSS rose {rise / mb:.1f} MB growing a {m['total'] / mb:.0f} MB checkpoint whose largest tensor is "
        f"{m['largest'] / mb:.1f} MB")
