"""Ctrl-C / SIGTERM on any one process of a multi-process run stops every process, at the same step, with no hang.

Why not let the signal raise where it lands: a process that leaves in the middle of a step does so inside a
collective (the gradient all-reduce, a barrier), and the others wait in theirs for one that never comes: with NCCL
until its timeout, minutes later, and under launchers without torchrun's agent for ever. So while the training loop
runs, the CLI's handler only records a signal (`interrupts.defer`), and before each step every process all-reduces
(max) "which signal, on which rank"; when one is set, all of them raise KeyboardInterrupt together, naming it. The
cost is one tiny all-reduce per step, and a stop that waits for the step in progress to end.

Single-process runs and library use (no CLI handlers installed) are left alone: there nothing can hang.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

from growkit import interrupts


class StopOnAnyRank:
    """Per-step agreement on a pending signal; `check()` before each step, `close()` after the loop."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.enabled = accelerator.num_processes > 1 and interrupts.installed()
        if self.enabled:
            interrupts.defer()

    def check(self) -> None:
        """Raise KeyboardInterrupt("SIGTERM on rank 1") on every process if any process has received a signal."""
        if not self.enabled:
            return
        import torch.distributed as dist

        name = interrupts.pending()  # (signal, rank) packed in one number, so the maximum keeps them together
        mine = (signal.Signals[name].value << 32) + self.accelerator.process_index if name else -1
        flag = torch.tensor([mine], dtype=torch.int64, device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed >= 0:
            raise KeyboardInterrupt(f"{signal.Signals(agreed >> 32).name} on rank {agreed & 0xFFFFFFFF}")

    def close(self) -> None:
        """After the loop: one last agreement (a signal during the last step), then signals raise at once again."""
        self.check()
        if self.enabled:
            interrupts.arm()
