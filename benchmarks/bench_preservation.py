"""Function preservation of every growth operator on the bundled trained models, as a markdown table.

Usage: python benchmarks/bench_preservation.py [--out-dir DIR]
Each row grows a bundled model (trained on stdlib text) and compares it with the source on real text
(`growkit.verify`: the start of the stdlib's textwrap.py, 128 tokens), loading the output with transformers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from growkit import grow

MODELS = Path(__file__).resolve().parents[1] / "models"
CASES = [
    ("clone 2x", dict(width="2x", method="clone")),
    ("clone 3x", dict(width="3x", method="clone")),
    ("clone 2x + noise 10 dB", dict(width="2x", method="clone", noise_snr_db=10.0)),
    ("copy-pad 2x", dict(width="2x", method="copy-pad")),
    ("net2net 2x", dict(width="2x", method="net2net")),
    ("net2net hidden 64->96, heads 4->6", dict(hidden=96, heads=6, ffn=None, method="net2net")),
    ("depth identity 2x", dict(layers="2x", depth_method="identity")),
    ("depth stack 2x", dict(layers="2x", depth_method="stack")),
    ("depth interleave 2x", dict(layers="2x", depth_method="interleave")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="growkit-bench-"))
    print("| model | growth | max abs Δlogits | max abs logit | loss source | loss grown | Δloss | keys |")
    print("|---|---|---|---|---|---|---|---|")
    for model in ("tiny-gpt2", "tiny-llama"):
        for name, options in CASES:
            options = {k: v for k, v in options.items() if v is not None}
            if model == "tiny-llama" and "heads" in options:
                options["ffn"] = 264  # 176 * 1.5
            result = grow(MODELS / model, work / f"{model}-{name.replace(' ', '_')}", verify=True, quiet=True,
                          overwrite=True, **options)
            v = result.provenance["verification"]
            keys = "ok" if not (v["missing_keys"] or v["unexpected_keys"]) else "MISMATCH"
            print(f"| {model} | {name} | {v['max_abs_dlogits']:.2e} | {v['max_abs_logit']:.1f} | "
                  f"{v['source_loss']:.4f} | {v['grown_loss']:.4f} | {v['dloss']:+.4f} | {keys} |")


if __name__ == "__main__":
    main()
