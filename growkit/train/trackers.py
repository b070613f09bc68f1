"""`--report-to`: the training metrics also go to an experiment tracker, through accelerate's trackers.

The default (`none`) keeps metrics.jsonl / metrics.csv / loss.png only. A tracker is checked before training starts
(accelerate itself would drop one whose package is missing without a word) and gets, per step, the same numbers
metrics.jsonl holds: loss, learning rate (the schedule's, and one per distinct µP multiplier), gradient norm, tokens
per second, eval loss, for a mixture of experts its load-balancing loss and each expert's token share; and each
`--grow-at` growth. Only the run's options and paths are logged as its configuration: never the environment, where
tokens and credentials live.

`accelerator.end_training()` is not used: it also destroys the process group, which a caller that reuses the
Accelerator (benchmarks, user code) still needs. The trackers are finished directly instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from growkit.errors import GrowkitError

#: HF Trainer's spelling; each name is accelerate's tracker of that name.
REPORT_TO = ("none", "tensorboard", "wandb", "trackio", "mlflow")
#: Where TensorBoard's event files go, relative to the run's output directory (then `growkit/`, the project name).
RUNS_DIR = "runs"
PROJECT = "growkit"


def _available() -> dict[str, tuple[Callable[[], bool], str]]:
    """Tracker -> (accelerate's own availability test, what to pip install)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, \
        is_wandb_available

    return {"tensorboard": (is_tensorboard_available, "tensorboard"), "wandb": (is_wandb_available, "wandb"),
            "trackio": (is_trackio_available, "trackio"), "mlflow": (is_mlflow_available, "mlflow")}


def check_report_to(name: str) -> None:
    """A known tracker whose package is installed, or `none`: checked before anything is loaded."""
    if name not in REPORT_TO:
        raise GrowkitError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {name!r}")
    if name == "none":
        return
    is_available, package = _available()[name]
    if not is_available():
        raise GrowkitError(f"--report-to {name}: the {package} package is not installed "
                           f"(pip install {package}, or growkit[trackers]); nothing was trained")


def accelerator_options(report_to: str, out_dir: Path | None) -> dict[str, Any]:
    """The `Accelerator(...)` arguments that set up the tracker: `log_with`, and `project_dir` for the event files."""
    if report_to == "none":
        return {}
    if out_dir is None:
        raise GrowkitError(f"--report-to {report_to} needs an output directory (out_dir) for the run")
    return {"log_with": [report_to], "project_dir": str(Path(out_dir) / RUNS_DIR)}


def _hyperparameters(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Flat scalars (what TensorBoard's hparams and MLflow's params take): lists and dicts as JSON, None dropped."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in config.items() if v is not None}


def group_lrs(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """One learning rate per distinct µP multiplier (`x1`, `x0.5`, ...): after a growth the optimizer has a group
    per tensor, and groups with one multiplier share one LR."""
    return {f"x{g.get('lr_mult', 1.0):.4g}": g["lr"] for g in param_groups}


class RunTrackers:
    """The trackers of one `fit` run: started with the run's configuration, fed each metrics row, finished."""

    def __init__(self, accelerator: Any, report_to: str, out_dir: Path | None, config: dict[str, Any],
                 resumed_at: int | None = None) -> None:
        self.accelerator = accelerator
        self.active = bool(getattr(accelerator, "log_with", None))
        self.growths_logged = 0
        if report_to != "none" and report_to not in [str(t) for t in accelerator.log_with]:
            raise GrowkitError(f"--report-to {report_to}: the Accelerator passed in was made without "
                               f"log_with={report_to!r}; make it with growkit.train.loop.make_accelerator or drop it")
        if not self.active:
            return
        name = Path(out_dir).name if out_dir is not None else PROJECT
        init = {"wandb": {"name": name, "dir": os.environ.get("WANDB_DIR", str(out_dir or "."))},
                "trackio": {"name": name}, "mlflow": {"run_name": name}}
        if resumed_at is not None:  # steps after the checkpoint were logged by the interrupted run: hide those
            init["tensorboard"] = {"purge_step": resumed_at + 1}
        try:
            accelerator.init_trackers(PROJECT, config=_hyperparameters(config), init_kwargs=init)
        except Exception as exc:  # noqa: BLE001 - any tracker's start-up failure (login, server) is the user's to fix
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise GrowkitError(f"--report-to {report_to}: the tracker did not start ({type(exc).__name__}: "
                               f"{first}); nothing was trained") from None

    def log_step(self, row: dict[str, Any]) -> None:
        """One metrics row (metrics.jsonl's) as tracker scalars at its step."""
        if not self.active:
            return
        values = {"train/loss": row["loss"], "train/learning_rate": row["lr"], "train/grad_norm": row.get("grad_norm"),
                  "train/tokens_per_s": row["tokens_per_s"], "train/epoch": row["epoch"], "eval/loss": row["eval_loss"],
                  **{f"train/lr/{k}": v for k, v in (row.get("lrs") or {}).items()},
                  # mixture-of-experts models (growkit.train.moe): load-balancing and z losses, each expert's share
                  "train/aux_loss": row.get("aux_loss"), "train/z_loss": row.get("z_loss"),
                  **{f"train/expert_fraction/{e}": f for e, f in enumerate(row.get("expert_fractions") or [])}}
        self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=row["step"])

    def log_growths(self, done: list[dict[str, Any]]) -> None:
        """The growths of `--grow-at` not logged yet: the parameter count after each, and its spec as text."""
        if not self.active:
            return
        for event in done[self.growths_logged:]:
            self.accelerator.log({"growth/parameters": event["parameters"][1], "growth/spec": event["spec"]},
                                 step=event["step"])
        self.growths_logged = len(done)

    def finish(self) -> None:
        """Flush and close every tracker, on the main process (the others have none started)."""
        if not self.active:
            return
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator.trackers.clear()  # a reused Accelerator starts its next run's trackers afresh
        self.active = False
