"""Continued training on `accelerate.Accelerator`: one CPU to many GPUs (or `accelerate launch` configs) unchanged.

`train()` is the checkpoint-to-checkpoint entry point behind `growkit train`: it validates every input before any
weight is loaded, tokenizes the data into blocks, builds µP groups, and runs `fit()`. `fit()` is the loop itself and
also takes an in-memory model and `TokenBlocks`, for benchmarks and user code.

Exact resume: model, optimizer, scheduler, RNG states and a small `TrainState` (the step) are saved together with
`accelerator.save_state`; the data position is a pure function of the step (`BlockSampler`), so a resumed run
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from growkit import interrupts
from growkit.checkpoint.outputs import check_path
from growkit.errors import GrowkitError
from growkit.pipeline import all_finite, check_seed
from growkit.train.blocks import BlockSampler, TokenBlocks, load_blocks, resolve_data_paths
from growkit.train.grad_clip import clip_grad_norm
from growkit.train.metrics import MetricsLog, finite_or_none, plot_curves
from growkit.train.stop_on_any_rank import StopOnAnyRank
from growkit.train.topology import check_fixed, check_topology
from growkit.train.trackers import RunTrackers, accelerator_options, group_lrs
from growkit.train.moe import check_router_options, lm_loss_only, router_loss_setup
from growkit.train.mup import describe_groups, mup_param_groups, scaled_base_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_DIR = "training_state"
#: What a run that failed before its first step leaves in --out: a new run may start there.
LEFT_BY_A_FAILED_START = {".data-cache", "train_args.json"}
SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (everything except model and data)."""

    steps: int = 1000
    lr: float = 3e-4
    batch_size: int = 8  # per process, per micro-step
    seq_len: int | None = None  # default: min(512, model positions)
    grad_accum: int = 1
    warmup: int | None = None  # default: 5% of steps (at least 1)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine/linear decay to lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    mup: bool | None = None  # None: on when a base config is known
    base_width: int | str | None = "auto"
    mixed_precision: str = "no"
    eval_every: int | None = None
    eval_blocks: int = 64  # evaluation uses the first N blocks of the eval data (fixed, so comparable)
    save_every: int | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    stop_after: int | None = None  # stop after this many steps of this run (checkpointing), keeping the schedule
    # Continue a schedule begun by another model (a grown model picking up where its small model stopped): this run
    # trains steps start_step..steps with those steps' LR; the optimizer state starts fresh.
    start_step: int = 0
    # Stream position (in steps) of this run's first batch; default start_step. Alone, it lets a grown model read on
    # where its small model stopped (no block seen twice) under a schedule of its own.
    data_start: int | None = None
    # Growth points "STEP:SPEC" (growkit.train.grow_loop): model, AdamW state and schedule grown between two steps.
    grow_at: list[str] = field(default_factory=list)
    # Mixture-of-experts models: the load-balancing loss's coefficient (None: the model config's)
    router_aux_loss_coef: float | None = None
    # and the router z-loss's (ST-MoE; 0: off), added to the training loss only
    router_z_loss_coef: float = 0.0
    quiet: bool = False
    # Experiment tracker for the metrics besides metrics.jsonl (growkit.train.trackers): none, tensorboard, wandb, ...
    report_to: str = "none"
    # --resume with another world size, global batch or --steps: go on instead of refusing (growkit.train.topology).
    allow_changed_topology: bool = False
    # Engine (growkit.train.engines): FSDP2, or DeepSpeed ZeRO stage 1-3; default plain data parallel.
    fsdp: bool = False
    deepspeed: int | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise GrowkitError(f"--steps must be at least 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GrowkitError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise GrowkitError("--batch-size and --grad-accum must be at least 1")
        if self.schedule not in SCHEDULES:
            raise GrowkitError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.mixed_precision not in PRECISIONS:
            raise GrowkitError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise GrowkitError(f"--max-grad-norm must be a number >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.warmup is not None and self.warmup < 0:
            raise GrowkitError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.start_step < self.steps:
            raise GrowkitError(f"--start-step must be in [0, steps), got {self.start_step} with --steps {self.steps}")
        if self.data_start is not None and self.data_start < 0:
            raise GrowkitError(f"--data-start must be >= 0, got {self.data_start}")
        check_seed(self.seed, maximum=2**32 - 1)  # numpy's generator, seeded with the others, takes 32 bits
        from growkit.train.trackers import check_report_to

        check_report_to(self.report_to)
        if self.grow_at:
            from growkit.train.grow_loop import parse_grow_at

            parse_grow_at(self.grow_at)
        from growkit.train.engines import check_request

        check_request(self)
        for name in ("eval_every", "save_every", "stop_after"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise GrowkitError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)


@dataclass
class TrainState:
    """The part of the run state that is not model/optimizer/scheduler/RNG: saved by `accelerator.save_state`."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, sd[f.name])


@dataclass
class TrainResult:
    out_dir: Path | None
    steps: int  # steps completed (global optimizer steps)
    train_loss: float | None  # mean training loss over the last min(20, steps) steps of this run
    eval_loss: float | None  # last evaluation loss
    history: list[dict] = field(default_factory=list)
    model: Any = None  # the trained model (unwrapped), for in-process use
    stopped_early: bool = False


def lr_lambda(cfg: TrainConfig):
    """Multiplier of the base LR at this run's scheduler step s (schedule step start_step + s): linear warm-up, then
    cosine/linear decay or constant."""
    warm = cfg.warmup_steps()
    total = cfg.steps
    floor = cfg.min_lr_ratio

    def f(s: int) -> float:
        s += cfg.start_step
        if s < warm:
            return (s + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warm) / max(1, total - warm))
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - frac)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def make_accelerator(mixed_precision: str = "no", cfg: TrainConfig | None = None, **options: Any):
    """An Accelerator for this process (picks up torchrun / `accelerate launch` environment) running the engine
    `cfg` and the launch ask for, or a one-line refusal (growkit.train.engines); `options` go to `Accelerator`
    (the trackers' `log_with` and `project_dir`)."""
    from growkit.train.engines import build_accelerator

    return build_accelerator(cfg or TrainConfig(mixed_precision=mixed_precision), **options)


@torch.no_grad()
def evaluate(model, blocks: TokenBlocks, accelerator=None, batch_size: int = 8, max_blocks: int = 64) -> float:
    """Mean next-token loss over the first `max_blocks` blocks, split across processes (same count on each)."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    n = min(max_blocks, len(blocks))
    n = max(world, n - n % world)
    mine = [i % len(blocks) for i in range(rank, n, world)]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), batch_size):
        x = blocks.batch(mine[i:i + batch_size]).to(device)
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, **lm_loss_only(model)).loss
        total[0] += loss.double() * len(x)
        total[1] += len(x)
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1])


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    if out.is_dir():
        for d in out.iterdir():
            if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / STATE_DIR).is_dir() \
                    and (d / "trainer_state.json").exists():
                try:
                    found.append((int(d.name[len(CHECKPOINT_PREFIX):]), d))
                except ValueError:
                    continue
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint directory under a run's output directory, if any."""
    found = _checkpoints(Path(out))
    return found[-1][1] if found else None


@contextlib.contextmanager
def _quiet_saving():
    """Silence per-save chatter (accelerate's tied-weight notice, transformers' shard progress bar)."""
    import logging

    from transformers.utils import logging as hf_logging

    acc = logging.getLogger("accelerate.utils.other")
    level, bars = acc.level, hf_logging.is_progress_bar_enabled()
    acc.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        acc.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _export_hf(accelerator, model, directory: Path, tokenizer=None, extra_files: dict[str, Any] | None = None) -> None:
    """Write a Hugging Face directory (config, safetensors, tokenizer) that `from_pretrained` loads."""
    state = accelerator.get_state_dict(model) if accelerator is not None else None  # collective under FSDP/DS
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(directory, state_dict=state, is_main_process=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        for name, content in (extra_files or {}).items():
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def _export_final(accelerator, model, out_dir: Path, tokenizer, extra_files: dict[str, Any], card: dict) -> None:
    """The final model, written whole into a hidden directory and then moved into the run's directory (config.json
    last), with a model card; a failure or interrupt before that leaves no part of it there."""
    from growkit.checkpoint.writer import publish_files
    from growkit.hub.card import write_model_card

    is_main = accelerator is None or accelerator.is_main_process
    tmp = out_dir / f".final-model-{os.getpid()}.tmp"
    try:
        with _quiet_saving():
            _export_hf(accelerator, model, tmp, tokenizer, extra_files)
        if is_main:
            write_model_card(tmp, card)
            interrupts.pause_point("final-export")
            publish_files(tmp, out_dir)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _card_provenance(provenance: dict | None, summary: dict, run_info: dict | None) -> dict:
    """What the training output's model card shows: the grown source's provenance with the training added, or for
    a checkpoint growkit did not make, the training alone."""
    if provenance is not None:
        return {**provenance, "training": summary}
    from growkit import __version__

    source = (run_info or {}).get("checkpoint")
    return {"growkit_version": __version__, "kind": "train", "source": {"path": source}, "training": summary,
            "command": shlex.join(["growkit", *sys.argv[1:]]) if sys.argv[1:] else "python api"}


def fit(model, train_blocks: TokenBlocks, cfg: TrainConfig, *, eval_blocks: TokenBlocks | None = None,
        base_config: Any = None, out_dir: Path | None = None, tokenizer=None, accelerator=None,
        resume_from: Path | None = None, provenance: dict | None = None, run_info: dict | None = None,
        on_step: Callable[[dict], bool] | None = None) -> TrainResult:
    """Train `model` on `train_blocks` for `cfg.steps` optimizer steps (µP groups when `base_config` is given).

    `on_step(row)` sees each step's metrics row (with `eval_loss` on evaluation steps); returning True ends the run
    there (e.g. once a target loss is reached), keeping the schedule of `cfg.steps`.

    With `out_dir`: metrics (JSONL/CSV), loss-curve PNG, checkpoints every `cfg.save_every` steps, and the final
    model in HF format. `resume_from` is a checkpoint directory written by an earlier run with the same data.
    """
    cfg.validate()
    accelerator = accelerator or make_accelerator(cfg=cfg, **accelerator_options(cfg.report_to, out_dir))
    from accelerate.utils import set_seed

    from growkit.train.engines import align_accumulation, check_prepared, describe_engine

    set_seed(cfg.seed)
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    B, K = cfg.batch_size, cfg.grad_accum
    T = train_blocks.seq_len
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (is_main and not cfg.quiet) else (lambda msg: None)

    use_mup = base_config is not None and cfg.mup is not False
    model.train()
    # Mixture of experts: the load-balancing loss in `.loss`, and each expert's share of tokens in the metrics.
    expert_load = router_loss_setup(model, cfg.router_aux_loss_coef, cfg.router_z_loss_coef)
    moe_kwargs = expert_load.forward_kwargs if expert_load is not None else {}
    groups = mup_param_groups(model, base_config if use_mup else None, cfg.lr, cfg.weight_decay)
    if use_mup:
        log(f"µP groups: {describe_groups(groups)}")
    growth = None
    if cfg.grow_at:
        from growkit.train.grow_loop import LoopGrowth

        growth = LoopGrowth(cfg.grow_at, accelerator, log)
        groups = growth.groups(model, groups, resume_from)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = TrainState(step=cfg.start_step)
    data_shift = (cfg.start_step if cfg.data_start is None else cfg.data_start) - cfg.start_step
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    align_accumulation(accelerator, K)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_prepared(accelerator, model, optimizer)
    if resume_from is not None:
        accelerator.load_state(str(Path(resume_from) / STATE_DIR))
        log(f"resumed from {resume_from} at step {state.step}")

    trackers = RunTrackers(accelerator, cfg.report_to, out_dir, {**_jsonable(cfg), **(run_info or {})},
                           state.step if resume_from is not None else None)
    metrics = MetricsLog(out_dir, state.step if resume_from is not None else None,
                         enabled=is_main and out_dir is not None) if out_dir is not None else None
    sampler = BlockSampler(len(train_blocks), cfg.seed)
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, state.step + cfg.stop_after)
    tokens_per_step = world * K * B * T
    history: list[dict] = []
    run_losses: list[float] = []
    last_eval: float | None = None

    def stop_if_diverged(what: str | None) -> None:
        """A non-finite loss, eval loss or weight ends the run: nothing non-finite is saved, earlier checkpoints stay."""
        if what is None and all(all_finite(p.detach()) for p in model.parameters()):
            return
        bar.close()
        last = latest_checkpoint(out_dir) if out_dir is not None else None
        kept = f"the last checkpoint ({last}) is finite" if last else "no checkpoint had been saved"
        raise GrowkitError(f"{out_dir or 'training'}: training diverged at step {state.step}: "
                           f"{what or 'weights became NaN or Inf'} (lower --lr?); stopped, {kept}")

    def save_checkpoint(step: int) -> None:
        stop_if_diverged(None)
        final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        with _quiet_saving():
            accelerator.save_state(str(tmp / STATE_DIR))
            _export_hf(accelerator, model, tmp, tokenizer)
        accelerator.wait_for_everyone()
        if is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({**asdict(state), "config": _jsonable(cfg),
                                                                "processes": world}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in _checkpoints(out_dir)[:-max(1, cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=state.step, disable=not is_main or cfg.quiet, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    t_run = time.perf_counter()
    elapsed_before = state.elapsed_s
    tokens_run = 0
    signals = StopOnAnyRank(accelerator)
    while state.step < stop:
        signals.check()
        if growth is not None:
            model, optimizer = growth.at(state.step, model, optimizer, scheduler)
            trackers.log_growths(growth.done)
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(K):
            idx = sampler.micro_batch(state.step + data_shift, micro, rank, world, K, B)
            x = train_blocks.batch(idx).to(accelerator.device)
            # accumulate: no gradient sync before the last micro-step; backward divides by K (DeepSpeed's engine
            # divides, and steps, itself)
            with accelerator.accumulate(model):
                output = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, **moe_kwargs)
                loss = output.loss if expert_load is None else expert_load.loss(output)
                accelerator.backward(loss)
            if expert_load is not None:
                expert_load.add(output)
            step_loss += loss.detach() / K
        # The norm before clipping (max_grad_norm None or 0: an infinite bound, which scales by 1), in the small
        # model's units after a growth; None under DeepSpeed (its engine clips)
        grad_norm = clip_grad_norm(accelerator, model, optimizer, cfg.max_grad_norm or math.inf)
        lr_now = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_mult", 1.0)
        lrs = group_lrs(optimizer.param_groups)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        tokens_run += tokens_per_step
        loss_val = float(accelerator.reduce(step_loss, reduction="mean")) if world > 1 else float(step_loss)
        if not math.isfinite(loss_val):
            stop_if_diverged(f"loss is {loss_val}")
        run_losses.append(loss_val)
        elapsed = time.perf_counter() - t_run
        state.elapsed_s = elapsed_before + elapsed
        row = {"step": state.step, "loss": round(loss_val, 6), "eval_loss": None, "lr": lr_now,
               "tokens": state.tokens, "tokens_per_s": round(tokens_run / max(elapsed, 1e-9), 1),
               "elapsed_s": round(state.elapsed_s, 3),
               "epoch": round(sampler.epoch_at(state.step + data_shift, world, K, B), 4),
               "grad_norm": finite_or_none(grad_norm), "lrs": lrs}
        if expert_load is not None:
            row.update(expert_load.row(accelerator))
        if eval_blocks is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.steps):
            last_eval = evaluate(model, eval_blocks, accelerator, B, cfg.eval_blocks)
            if not math.isfinite(last_eval):
                stop_if_diverged(f"eval loss is {last_eval}")
            row["eval_loss"] = round(last_eval, 6)
        history.append(row)
        if metrics is not None:
            metrics.log(row)
        trackers.log_step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        **({"eval": f"{last_eval:.4f}"} if row["eval_loss"] is not None else {}))
        if out_dir is not None and ((cfg.save_every and state.step % cfg.save_every == 0)
                                    or (state.step == stop and stop < cfg.steps)):
            save_checkpoint(state.step)
            interrupts.pause_point("checkpoint-saved")
        if on_step is not None and on_step(row):
            break
    bar.close()
    signals.close()

    finished = state.step >= cfg.steps
    tail = run_losses[-20:]
    result = TrainResult(out_dir=out_dir, steps=state.step, train_loss=sum(tail) / len(tail) if tail else None,
                         eval_loss=last_eval, history=history, model=accelerator.unwrap_model(model),
                         stopped_early=not finished)
    if out_dir is not None:
        if is_main and metrics is not None:
            plot_curves(metrics.rows(), out_dir / "loss.png", title=f"growkit train: {out_dir.name}")
        if finished:
            stop_if_diverged(None)
            summary = {"steps": state.step, "tokens": state.tokens, "train_loss": result.train_loss,
                       "eval_loss": last_eval, "elapsed_s": round(state.elapsed_s, 2), "processes": world,
                       **describe_engine(accelerator, B, K, T),
                       "mup": use_mup, "config": _jsonable(cfg), **(run_info or {}),
                       **({"growths": growth.done} if growth is not None else {})}
            card = _card_provenance(provenance, summary, run_info)
            extra = {"training.json": summary}
            if provenance is not None:  # then `card` is exactly the source's provenance with the training added
                extra["growkit.json"] = card
            _export_final(accelerator, model, out_dir, tokenizer, extra, card)
        accelerator.wait_for_everyone()
    trackers.finish()
    log(f"done: {state.step} steps, train loss {result.train_loss:.4f}"
        + (f", eval loss {last_eval:.4f}" if last_eval is not None else "")
        + ("; stopped early, resume with --resume" if not finished else ""))
    accelerator.free_memory()
    custom = getattr(accelerator, "_custom_objects", None)  # let a reused Accelerator forget this run's objects
    if isinstance(custom, list):
        custom[:] = [o for o in custom if o is not scheduler and o is not state
                     and (growth is None or o is not growth.frozen)]
    return result


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["betas"] = list(cfg.betas)
    return d


def _model_positions(config: dict) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve_base_config(ckpt: Path, config: dict, mup: bool | None, base_width: int | str | None) -> tuple[Any, str | None]:
    """The µP base config and where it came from: `--base-width N`, else growkit.json provenance, else none."""
    if mup is False:
        return None, None
    if base_width not in (None, "auto", ""):
        try:
            width = int(base_width)
        except (TypeError, ValueError):
            raise GrowkitError(f"--base-width must be 'auto' or an integer, got {base_width!r}") from None
        return scaled_base_config(config, width), f"--base-width {width}"
    prov_path = ckpt / "growkit.json"
    if prov_path.exists():
        try:
            prov = json.loads(prov_path.read_text())
            base = prov["source"]["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GrowkitError(f"{prov_path}: no source config in the provenance (source.config)") from None
        if prov.get("kind") == "shrink":
            # The source is wider: its shapes as the base would multiply learning rates (µP transfers an LR tuned
            # on a narrower model to a wider one, not back).
            if mup:
                raise GrowkitError(f"{prov_path}: this checkpoint was shrunk from a wider model, which is no µP base; "
                                   "pass --base-width N (narrower than this model) or drop --mup")
            return None, f"off ({prov_path.name}: shrunk from a wider model)"
        if prov.get("kind") == "upcycle":
            # A MoE made from a dense model of the same width (another family): the model is its own base, so every
            # multiplier is 1 (experts are slices of the dense FFN, not a wider model).
            return config, f"{prov_path.name} (upcycled at its source's width: every multiplier 1)"
        return base, f"{prov_path.name} (source {prov['source'].get('model_type', '?')})"
    if mup:
        raise GrowkitError(f"{ckpt} has no growkit.json provenance; pass --base-width N to set the µP base width")
    return None, None


def train(checkpoint: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
          out: str | os.PathLike, *, eval_data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
          resume: bool = False, text_field: str = "text", accelerator=None, **options: Any) -> TrainResult:
    """Continue training a checkpoint on local text/JSONL files and write a Hugging Face checkpoint to `out`.

    Options are the fields of `TrainConfig` (steps, lr, batch_size, seq_len, grad_accum, warmup, schedule,
    weight_decay, mup, base_width, mixed_precision, eval_every, save_every, seed, ...). Every input is validated
    before any training starts; problems raise `GrowkitError` with a one-line message.
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train() got unknown options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**options)
    cfg.validate()
    ckpt, out = Path(checkpoint), Path(out)
    data_paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    eval_paths = None if eval_data is None else ([eval_data] if isinstance(eval_data, (str, os.PathLike)) else list(eval_data))

    # 1. The checkpoint: a directory with config.json and a tokenizer.
    if not ckpt.is_dir() or not (ckpt / "config.json").exists():
        raise GrowkitError(f"checkpoint {ckpt} is not a model directory (no config.json)")
    config = json.loads((ckpt / "config.json").read_text())
    if not any((ckpt / f).exists() for f in TOKENIZER_FILES):
        raise GrowkitError(f"checkpoint {ckpt} has no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    positions = _model_positions(config)
    if cfg.seq_len is None:
        cfg.seq_len = min(512, positions or 512)
    if positions is not None and cfg.seq_len > positions:
        raise GrowkitError(f"--seq-len {cfg.seq_len} exceeds the model's {positions} positions ({ckpt / 'config.json'})")
    if cfg.grow_at:
        from growkit.train.grow_loop import check_schedule, parse_grow_at

        check_schedule(config, parse_grow_at(cfg.grow_at), cfg.start_step, cfg.steps)
    # 2. The data.
    resolve_data_paths(data_paths)
    if eval_paths is not None:
        resolve_data_paths(eval_paths)
    check_path(out, [ckpt, *data_paths, *(eval_paths or [])], "--out")
    # 3. The output directory and resume point.
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise GrowkitError(f"--resume: no checkpoint in {out} to resume from")
        check_fixed(resume_from, cfg)
    elif out.exists() and ((out / "metrics.jsonl").exists() or _checkpoints(out)):
        raise GrowkitError(f"output directory {out} already holds a training run; pass --resume or choose another -o")
    elif out.exists() and not out.is_dir():
        raise GrowkitError(f"{out}: --out exists and is not a directory")
    elif out.exists() and {p.name for p in out.iterdir()} - LEFT_BY_A_FAILED_START:
        raise GrowkitError(f"output directory {out} exists and holds other files; training writes into an empty "
                           "(or new) directory, choose another -o")
    check_router_options(config.get("num_experts_per_tok") is not None, cfg.router_aux_loss_coef,
                         cfg.router_z_loss_coef)
    # 4. µP base shapes.
    base_config, base_source = resolve_base_config(ckpt, config, cfg.mup, cfg.base_width)
    provenance = None
    if (ckpt / "growkit.json").exists():
        try:
            provenance = json.loads((ckpt / "growkit.json").read_text())
        except json.JSONDecodeError:
            raise GrowkitError(f"{ckpt / 'growkit.json'} is not valid JSON") from None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a user-facing problem with the directory
        raise GrowkitError(f"checkpoint {ckpt}: tokenizer does not load ({type(exc).__name__}: {str(exc)[:120]})") from None
    accelerator = accelerator or make_accelerator(cfg=cfg, **accelerator_options(cfg.report_to, out))
    if accelerator.is_main_process and not cfg.quiet:
        from growkit.train.engines import describe_engine, engine_line

        info = describe_engine(accelerator, cfg.batch_size, cfg.grad_accum, cfg.seq_len)
        print(f"growkit train: {engine_line(info, cfg.batch_size, cfg.grad_accum)}", file=sys.stderr)
    if resume_from is not None:
        for note in check_topology(resume_from, cfg, accelerator.num_processes):
            if accelerator.is_main_process:
                print(note, file=sys.stderr)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    cache = out / ".data-cache"
    train_blocks = load_blocks(data_paths, tokenizer, cfg.seq_len, cache, accelerator, text_field)
    eval_blocks = load_blocks(eval_paths, tokenizer, cfg.seq_len, cache, accelerator, text_field) if eval_paths else None
    if eval_blocks is not None and cfg.eval_every is None:
        cfg.eval_every = max(1, cfg.steps // 10)
    model_dir = ckpt
    if cfg.grow_at:
        from growkit.train.grow_loop import resume_model_dir

        model_dir = resume_model_dir(ckpt, resume_from, cfg.grow_at)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if accelerator.is_main_process and not cfg.quiet:
        print(f"growkit train: {ckpt} ({sum(p.numel() for p in model.parameters()):,} params), "
              f"{len(train_blocks):,} blocks of {cfg.seq_len} tokens, µP base: {base_source or 'off'}", file=sys.stderr)
    run_info = {"checkpoint": str(ckpt), "data": [str(p) for p in data_paths],
                "eval_data": [str(p) for p in eval_paths] if eval_paths else None, "mup_base": base_source}
    if accelerator.is_main_process:
        (out / "train_args.json").write_text(json.dumps({**run_info, "config": _jsonable(cfg)}, indent=2) + "\n")
    return fit(model, train_blocks, cfg, eval_blocks=eval_blocks, base_config=base_config, out_dir=out,
               tokenizer=tokenizer, accelerator=accelerator, resume_from=resume_from, provenance=provenance,
               run_info=run_info)
