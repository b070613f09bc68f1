"""`growkit train`: continued training of a checkpoint (the typer command; the work is in growkit.train.loop)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def train_command(
    checkpoint: Path = typer.Argument(..., help="Model directory (HF format, with tokenizer), e.g. a grown checkpoint."),
    more_data: Optional[List[Path]] = typer.Argument(None, hidden=True, help="Further data paths after --data."),
    data: List[Path] = typer.Option([], "--data", "-d", help="Text/JSONL files or directories (repeat, or list after it)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (checkpoints, metrics, final model)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (the small model's, with µP)."),
    batch_size: int = typer.Option(8, help="Sequences per process per micro-step."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: min(512, model positions))."),
    grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up steps (default: 5% of steps)."),
    schedule: str = typer.Option("cosine", help="cosine | constant | linear."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (matrices and embeddings only)."),
    mup: Optional[bool] = typer.Option(None, "--mup/--no-mup", help="µP LR groups (default: on when a base is known)."),
    base_width: str = typer.Option("auto", help="µP base hidden size: 'auto' (from growkit.json) or N."),
    mixed_precision: str = typer.Option("no", help="no | bf16 | fp16."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard model, gradients and optimizer state with FSDP2 (each "
                                                    "decoder layer a unit; needs a multi-process launch)."),
    deepspeed: Optional[int] = typer.Option(None, "--deepspeed", metavar="STAGE", help="Train with DeepSpeed ZeRO "
                                            "stage 1, 2 or 3 (config built from these options; multi-process)."),
    max_grad_norm: float = typer.Option(1.0, help="Clip the gradient norm to this (0: no clipping)."),
    eval_data: Optional[List[Path]] = typer.Option(None, "--eval-data", help="Held-out text/JSONL for evaluation."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps (default: steps/10 with --eval-data)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (needed for --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    seed: int = typer.Option(0, help="Seed for data order and RNG."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after N steps of this run, keeping the schedule of "
                                                        "--steps (a checkpoint is saved there: grow it, or --resume)."),
    start_step: int = typer.Option(0, help="Continue a schedule (and data stream) begun by the small model: train "
                                           "steps START..STEPS with their LR and blocks."),
    data_start: Optional[int] = typer.Option(None, help="Stream position (steps) of the first batch (default "
                                                        "--start-step): read on where the small model stopped."),
    grow_at: List[str] = typer.Option([], "--grow-at", help="Grow during the run: STEP:KEY=VALUE[,...] with keys "
                                      "width, hidden, ffn, heads, kv-heads, layers, method, depth-method, noise (dB "
                                      "or none; default 10), seed, untie-head (yes/no), freeze (none/old/new: "
                                      "train only the old or only the new entries until the next growth); e.g. "
                                      "300:width=2x (repeatable). The AdamW state and the schedule carry over."),
    router_aux_loss_coef: Optional[float] = typer.Option(None, "--router-aux-loss-coef", help="Mixture-of-experts "
                                                         "models: load-balancing loss weight (default: the config's)."),
    router_z_loss_coef: float = typer.Option(0.0, "--router-z-loss-coef", help="Mixture-of-experts models: router "
                                             "z-loss weight (ST-MoE, mean logsumexp(router logits)^2; 0: off)."),
    text_field: str = typer.Option("text", help="JSONL field holding the text."),
    report_to: str = typer.Option("none", "--report-to", help="Also log the metrics to an experiment tracker: "
                                  "tensorboard (OUT/runs), wandb, trackio, mlflow, or none (metrics.jsonl/csv only)."),
    allow_changed_topology: bool = typer.Option(False, "--allow-changed-topology", help="--resume with another "
                                                "number of processes, global batch or --steps: go on (the run says "
                                                "how the data stream and LR schedule continue) instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Continue training a checkpoint with Accelerate (works under torchrun / accelerate launch), µP LR groups."""
    from growkit.errors import Interrupted
    from growkit.train.loop import train

    try:
        train(checkpoint, [*data, *(more_data or [])], out, eval_data=eval_data or None, resume=resume,
              text_field=text_field, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
              grad_accum=grad_accum, warmup=warmup, schedule=schedule, weight_decay=weight_decay, mup=mup,
              base_width=base_width, mixed_precision=mixed_precision, fsdp=fsdp, deepspeed=deepspeed,
              max_grad_norm=max_grad_norm or None,
              eval_every=eval_every, save_every=save_every,
              seed=seed, stop_after=stop_after, start_step=start_step, data_start=data_start, grow_at=grow_at,
              router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef, quiet=quiet,
              report_to=report_to,
              allow_changed_topology=allow_changed_topology)
    except KeyboardInterrupt as exc:  # typer would swallow it into a silent exit 130
        raise Interrupted(f"{out}: training interrupted by {str(exc) or 'SIGINT'}; checkpoints saved so far are kept "
                          "(continue with --resume), the final model was not written") from None
