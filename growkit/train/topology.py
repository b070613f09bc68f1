"""`--resume` checks: what a checkpoint was saved with against what the resumed run would do.

Why: a step of a run reads the global-batch positions [s*G, (s+1)*G) of one shuffled block stream (`BlockSampler`)
and takes the learning rate of step s of a schedule over `--steps`. Resuming with another number of processes,
per-process batch or accumulation, or another `--steps`, used to go ahead silently and change the data stream or the
schedule. Now it is refused in one line, unless `--allow-changed-topology` says to go on; then the run says on
stderr exactly how it continues:

- same global batch (processes x batch x accumulation): every step reads the same blocks and takes the same LR as
  before, so the run continues as the uninterrupted one would (up to float summation order); processes that the
  checkpoint has no random state for start theirs from the seed. Another split of the same global batch between
  batch size and accumulation, on as many processes, needs no flag (it changes memory use, not the run).
- another global batch G': step s reads positions [s*G', (s+1)*G') of the same stream, so from the resumed step on
  the run skips (larger batch) or reads again (smaller batch) the blocks between the two positions.
- another `--steps`: the LR follows the schedule of the new length from the resumed step on (warm-up included when
  it is 5% of the steps), so it jumps there to the new schedule's value.

Sequence length, seed and growth points define the stream and the model itself: they are never allowed to change.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from growkit.errors import GrowkitError

#: Config keys a resumed run must keep, whatever it is told (the blocks, their order, the growth schedule).
FIXED = ("seq_len", "seed", "grow_at")


def _saved(resume_from: Path) -> dict[str, Any]:
    return json.loads((Path(resume_from) / "trainer_state.json").read_text())


def check_fixed(resume_from: Path, cfg: Any) -> None:
    """Refuse a resume that changes the blocks, their order or the growth schedule (before anything is loaded)."""
    saved = _saved(resume_from)["config"]
    for key in FIXED:
        if saved.get(key, [] if key == "grow_at" else None) != getattr(cfg, key):
            raise GrowkitError(f"--resume: {key} was {saved.get(key)} in {Path(resume_from).name}, now "
                               f"{getattr(cfg, key)}; resuming needs the same value")


def check_topology(resume_from: Path, cfg: Any, world: int) -> list[str]:
    """Refuse (one line) a resume with another world size, global batch or step count, unless
    `cfg.allow_changed_topology`; then return the lines that say how the run continues (empty when nothing changed).

    Checkpoints written before the world size was recorded are compared on batch size and accumulation only."""
    state = _saved(resume_from)
    saved, step, name = state["config"], state["step"], Path(resume_from).name
    old_world = state.get("processes")
    B, K = cfg.batch_size, cfg.grad_accum
    old_global = old_world * saved["batch_size"] * saved["grad_accum"] if old_world else None
    new_global = world * B * K
    split = (saved["batch_size"], saved["grad_accum"])
    if old_global is None and split != (B, K):  # without the world size, only the old rule can be checked
        old_global, new_global = saved["batch_size"] * saved["grad_accum"], B * K
    changed = []
    if old_world is not None and old_world != world:
        changed.append(f"{old_world} processes (now {world})")
    if old_global is not None and old_global != new_global:
        changed.append(f"global batch {old_global} (now {new_global})")
    if saved["steps"] != cfg.steps:
        changed.append(f"--steps {saved['steps']} (now {cfg.steps})")
    if not changed:
        return [] if split == (B, K) else [
            f"--resume: --batch-size {B} --grad-accum {K} (was {split[0]}, {split[1]}): the same global batch "
            f"{new_global}, so the same data stream"]
    if cfg.steps <= step:
        raise GrowkitError(f"--resume: --steps {cfg.steps} is not past {name}'s step {step}; nothing to train")
    if not cfg.allow_changed_topology:
        raise GrowkitError(f"--resume: {name} was saved with {', '.join(changed)}; resume with the same, or pass "
                           "--allow-changed-topology to go on (the run then says how its data stream and LR schedule "
                           "continue)")
    return _how_it_continues(cfg, saved, step, old_global, new_global)


def _how_it_continues(cfg: Any, saved: dict[str, Any], step: int, old_global: int | None,
                      new_global: int) -> list[str]:
    from growkit.train.loop import lr_lambda

    notes = []
    shift = (cfg.start_step if cfg.data_start is None else cfg.data_start) - cfg.start_step
    if old_global is None or old_global == new_global:
        notes.append(f"--allow-changed-topology: global batch {new_global} as before: the data stream is unchanged")
    else:
        was, now = (step + shift) * old_global, (step + shift) * new_global
        what = "skips" if now > was else "reads again"
        notes.append(f"--allow-changed-topology: global batch {old_global} -> {new_global}: step {step + 1} reads "
                     f"stream positions {now}..{now + new_global - 1}, the checkpointed run had read up to {was - 1}: "
                     f"it {what} {abs(now - was)} blocks")
    if saved["steps"] != cfg.steps:
        old = lr_lambda(replace(cfg, steps=saved["steps"], warmup=saved.get("warmup")))(step - cfg.start_step)
        new = lr_lambda(cfg)(step - cfg.start_step)
        notes.append(f"--allow-changed-topology: the LR follows the {cfg.schedule} schedule of {cfg.steps} steps from "
                     f"step {step + 1} on: x{new:.4g} of --lr there (the {saved['steps']}-step schedule had "
                     f"x{old:.4g})")
    return notes
