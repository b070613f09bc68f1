"""Determinism: the same source, options and seed give byte-identical files, across runs and across torch thread
counts (torch's own float reductions split work by thread count, so anything random or data-dependent must not
go through them).

What "byte-identical" covers: every weight shard (header, metadata and data), the shard index, config.json,
the copied tokenizer/generation files and the model card; growkit.json too, except its `created` timestamp, which
records when the run happened and is the one field allowed to differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers as T

from cli_util import cli_env, snapshot
from growkit.operators import OPERATORS

# Options that exercise every data-dependent or random step: symmetric noise (weight std), fresh neurons
# (random readers scaled by the std, mean-filled norm gains), random duplication (net2net), depth.
RUNS = {
    "clone-noise": dict(width="2x", noise_snr_db=20, seed=3),
    "copy-pad": dict(width="2x", method="copy-pad", seed=3),
    "net2net-depth": dict(hidden=320, ffn=640, heads=10, kv_heads=5, method="net2net", layers="3", seed=3,
                          max_shard_size="300KB"),
    "rc-sample-kde": dict(width="2x", method="rc-sample", seed=3,  # reader noise from a fitted kernel
                          operator_options={"estimator": "kde", "sampling": "stratified"}),
}
# Every other operator that can grow (e.g. ones fitted to the weights) at its defaults, so a new operator is covered.
RUNS.update({name: dict(width="2x", method=name, seed=3) for name, op in OPERATORS.items()
             if "grow" in op.directions and name not in ("clone", "copy-pad", "net2net")})

SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from growkit import grow
for name, options in json.loads(sys.argv[4]).items():
    grow(sys.argv[2], f"{sys.argv[3]}/{name}", quiet=True, **options)
"""


def _source(path: Path) -> Path:
    # Tensors well above torch's parallel grain (32768 elements), so that 1 and 2 threads really split differently.
    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                        num_hidden_layers=2, vocab_size=1024, max_position_embeddings=128)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _without_created(files: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(files)
    prov = json.loads(out.pop("growkit.json"))
    assert prov.pop("created")
    out["growkit.json (without created)"] = json.dumps(prov, sort_keys=True).encode()
    return out


def test_same_bytes_across_runs_and_thread_counts(tmp_path):
    src = _source(tmp_path / "src")
    # Two separate runs that differ in thread count: identical bytes cover "across runs" (an unseeded draw would
    # differ between any two processes) and "across thread counts" at once.
    jobs = {"1 thread": 1, "2 threads": 2}

    def run(item: tuple[str, int]) -> Path:
        label, threads = item
        out = tmp_path / label.replace(" ", "-")
        subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(src), str(out), json.dumps(RUNS)],
                       check=True, env=cli_env(), timeout=300)
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        outs = dict(zip(jobs, pool.map(run, jobs.items())))
    for name in RUNS:
        trees = {label: _without_created(snapshot(out / name)) for label, out in outs.items()}
        reference = trees["1 thread"]
        assert any(k.endswith(".safetensors") for k in reference) and "config.json" in reference
        for label, tree in trees.items():
            assert tree.keys() == reference.keys(), (name, label)
            differ = [k for k in tree if tree[k] != reference[k]]
            assert not differ, f"{name}: {label} differs from 1 thread in {differ}"
