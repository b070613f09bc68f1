"""Training metrics: one JSON line and one CSV row per logged step, and a loss-curve PNG.

The JSON line also holds `lrs`, the learning rate of each distinct µP multiplier (`{"x1": ..., "x0.5": ...}`); the
CSV keeps one scalar per column.

Why both: JSONL is easy to load and append; CSV opens in any spreadsheet. On resume, rows past the resumed step
are dropped first so the files never hold two histories.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

COLUMNS = ("step", "loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "epoch")


def finite_or_none(value: Any) -> float | None:
    """A metric as a JSON number: None when absent or not finite (an fp16 step whose scaled gradients overflowed
    has an infinite norm and is skipped; JSON has no Inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only metrics in `<dir>/metrics.jsonl` and `<dir>/metrics.csv` (main process only)."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = Path(out_dir) / "metrics.jsonl"
        self.csv = Path(out_dir) / "metrics.csv"
        if not enabled:
            return
        rows = read_jsonl(self.jsonl) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as fh:  # allow_nan=False: a bare NaN is not JSON (the loop stops before one)
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore").writerow(row)

    def rows(self) -> list[dict]:
        return read_jsonl(self.jsonl)


def plot_curves(rows: Iterable[dict], png: Path, title: str = "growkit train") -> Path:
    """Training loss (raw and smoothed) and evaluation loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    loss = [r["loss"] for r in rows if r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if loss:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        k = max(1, len(loss) // 50)
        smooth, acc = [], 0.0
        for i, v in enumerate(loss):
            acc += v
            if i >= k:
                acc -= loss[i - k]
            smooth.append(acc / min(i + 1, k))
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"train loss (mean of {k})")
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="tab:red", ms=3, label="eval loss")
    finite = [v for v in loss + [v for _, v in ev] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), min(hi, lo + 3 * (sorted(finite)[len(finite) // 2] - lo) + 0.5))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
