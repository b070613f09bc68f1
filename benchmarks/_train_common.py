"""Shared pieces of the training benchmarks: stdlib blocks, FLOPs per token, a run with an eval curve.

Every run goes through `growkit.train.fit` (the same loop as `growkit train`) with one in-process Accelerator,
the same block order (BlockSampler seed), the same fixed validation blocks and an explicit schedule.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from growkit.train.blocks import TokenBlocks  # noqa: E402
from growkit.train.data import iter_stdlib_texts  # noqa: E402
from growkit.train.loop import TrainConfig, evaluate, fit, make_accelerator  # noqa: E402

SEQ = 128
BATCH = 16
EVAL_BLOCKS = 128


def stdlib_blocks(tokenizer, seq_len: int = SEQ, max_bytes: tuple[int, int] | None = None
                  ) -> tuple[TokenBlocks, TokenBlocks]:
    """Train and validation blocks of the stdlib split (the data the bundled models were trained on); `max_bytes`
    (train, val) keeps only the first bytes of each split (smoke runs)."""
    train_bytes, val_bytes = max_bytes or (None, None)
    train = TokenBlocks.from_texts(list(iter_stdlib_texts("train", train_bytes)), tokenizer, seq_len)
    val = TokenBlocks.from_texts(list(iter_stdlib_texts("val", val_bytes)), tokenizer, seq_len)
    return train, val


def prepare_run(args, default_out: Path, accelerator=None, max_bytes: tuple[int, int] | None = None):
    """What every training benchmark does first: resolve --out, set --threads, load the bundled tokenizer, cut the
    stdlib corpus into train/val blocks and make the accelerator (unless given one). Returns (tokenizer, train, val,
    accelerator)."""
    import torch
    import transformers as T

    args.out = args.out or default_out
    torch.set_num_threads(args.threads)
    tok = T.AutoTokenizer.from_pretrained(REPO / "models" / "tokenizer")
    train_blocks, val_blocks = stdlib_blocks(tok, max_bytes=max_bytes)
    return tok, train_blocks, val_blocks, accelerator or make_accelerator()


def flops_per_token(config, seq_len: int = SEQ) -> float:
    """Training FLOPs per token, 6 N + 6 L T d (Kaplan et al.): N counts every matrix a token passes through,
    including the LM head and excluding the embedding lookups; the second term is attention scores and mixing.
    A mixture of experts counts its active parameters: the router and the top-k experts' FFNs (plus a shared
    expert), not the experts a token skips."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = cfg.get("hidden_size") or cfg["n_embd"]
    L = cfg.get("num_hidden_layers") or cfg["n_layer"]
    V = cfg["vocab_size"]
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads") or heads
    if cfg["model_type"] == "gpt2":
        ffn = cfg.get("n_inner") or 4 * d
        per_layer = d * 3 * d + d * d + 2 * d * ffn
    else:
        ffn = cfg["intermediate_size"]
        router = 0
        if cfg.get("num_experts_per_tok"):
            experts = cfg.get("num_local_experts") or cfg["num_experts"]
            ffn = cfg["num_experts_per_tok"] * (cfg.get("moe_intermediate_size") or ffn) \
                + (cfg.get("shared_expert_intermediate_size") or 0)
            router = d * experts
        per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ffn + router
    n = L * per_layer + V * d
    return 6.0 * n + 6.0 * L * seq_len * heads * hd


@dataclass
class Curve:
    """Validation loss against optimizer step (step 0 = before training)."""

    label: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    completed: int = 0

    def first_step_at_or_below(self, target: float) -> float | None:
        """Step at which the eval curve first reaches `target`, linearly interpolated between evaluations."""
        for i, (s, v) in enumerate(zip(self.steps, self.losses)):
            if v <= target:
                if i == 0:
                    return float(s)
                s0, v0 = self.steps[i - 1], self.losses[i - 1]
                return s0 + (s - s0) * (v0 - target) / (v0 - v) if v0 != v else float(s)
        return None

    def as_dict(self) -> dict:
        return {"label": self.label, "steps": self.steps, "losses": self.losses, "seconds": round(self.seconds, 1),
                "completed": self.completed}


def run(model, label: str, train_blocks: TokenBlocks, val_blocks: TokenBlocks, *, steps: int, lr: float,
        eval_every: int, base_config=None, seed: int = 0, stop_below: float | None = None, accelerator=None,
        warmup: int | None = None, batch_size: int = BATCH, eval_blocks: int = EVAL_BLOCKS, **schedule) -> Curve:
    """Train with the shared recipe, evaluating every `eval_every` steps; optionally stop once the eval loss is at
    or below `stop_below` (the schedule stays that of `steps`). `schedule`: start_step / data_start / stop_after
    (TrainConfig fields) for runs that continue or stop part-way through a schedule."""
    accelerator = accelerator or make_accelerator()
    model.to(accelerator.device)  # the step-0 evaluation runs before `fit` prepares (and moves) the model
    curve = Curve(label)
    curve.steps.append(0)
    curve.losses.append(evaluate(model, val_blocks, accelerator, batch_size, eval_blocks))
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, schedule="cosine", min_lr_ratio=0.1,
                      weight_decay=0.1, eval_every=eval_every, eval_blocks=eval_blocks, seed=seed, quiet=True,
                      mup=base_config is not None, **schedule)

    def on_step(row: dict) -> bool:
        curve.train_losses.append(row["loss"])
        if row["eval_loss"] is not None:
            curve.steps.append(row["step"] - schedule.get("start_step", 0))  # steps of this run
            curve.losses.append(row["eval_loss"])
            return stop_below is not None and row["eval_loss"] <= stop_below
        return False

    t0 = time.perf_counter()
    res = fit(model, train_blocks, cfg, eval_blocks=val_blocks, base_config=base_config, accelerator=accelerator,
              on_step=on_step)
    curve.seconds = time.perf_counter() - t0
    curve.completed = res.steps
    return curve


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def save_png(fig, png: Path) -> None:
    """Lay out, write and close a matplotlib figure (the benchmarks' plots)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
