"""Where `growkit shrink --method subclone` spends its time and memory: wall, CPU and peak RSS of each phase.

    OMP_NUM_THREADS=1 python benchmarks/profile_subclone.py [CHECKPOINT] [--rescale MODE]

Default: the real SmolLM2-135M conversion (benchmarks/bench_real.py) shrunk to hidden 384, heads 6, kv heads 2,
ffn 1024, calibrated on the stdlib's argparse.py and functools.py (train split). Phases are timed by wrapping the
functions that do them (activation importance, choosing the rescale mode, each candidate's build and loss); peak RSS
by polling psutil every 10 ms. Prints one line per phase.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import growkit  # noqa: E402
import growkit.pipeline  # noqa: E402
import growkit.verify  # noqa: E402
from growkit.operators import shrink as shrink_module  # noqa: E402
from growkit.train.data import stdlib_root  # noqa: E402

_proc = psutil.Process()
_peak = [0]
phases: list[tuple[str, float, float, float, float]] = []


def _poll() -> None:
    while True:
        _peak[0] = max(_peak[0], _proc.memory_info().rss)
        time.sleep(0.01)


def timed_phase(owner: object, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that records (label, wall, CPU, RSS before, peak RSS during) per call."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        _peak[0] = before = _proc.memory_info().rss
        wall, cpu = time.time(), time.process_time()
        out = inner(*args, **kwargs)
        phases.append((label, time.time() - wall, time.process_time() - cpu, before / 2**20, _peak[0] / 2**20))
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(Path.home() / ".cache" / "growkit-real" / "smollm2-135m"))
    ap.add_argument("--out", default="/tmp/growkit-profile-subclone")
    ap.add_argument("--rescale", default=None)
    args = ap.parse_args()
    threading.Thread(target=_poll, daemon=True).start()
    timed_phase(shrink_module, "activation_importance", "importance pass")
    timed_phase(shrink_module.Subclone, "choose_rescale", "rescale auto, every candidate")
    timed_phase(growkit.pipeline, "grown_model", "  one candidate: build")
    timed_phase(growkit.verify, "next_token_loss", "  one candidate: loss")
    calibration = [str(stdlib_root() / f) for f in ("argparse.py", "functools.py")]
    wall, cpu = time.time(), time.process_time()
    result = growkit.shrink(args.checkpoint, args.out, hidden=384, heads=6, kv_heads=2, ffn=1024, method="subclone",
                            calibration=calibration, rescale=args.rescale, overwrite=True, quiet=True)
    for label, w, c, before, peak in phases:
        print(f"{label:32s} {w:7.1f} s wall {c:7.1f} s CPU   RSS before {before:6.0f} MB, peak {peak:6.0f} MB")
    print(f"{'whole shrink':32s} {time.time() - wall:7.1f} s wall {time.process_time() - cpu:7.1f} s CPU   "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"{torch.get_num_threads()} torch threads")
    options = result.provenance["options"]
    print(f"chosen {options.get('rescale_chosen')}: {options.get('rescale_losses')}")


if __name__ == "__main__":
    main()
