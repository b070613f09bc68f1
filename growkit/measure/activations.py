"""Per-dimension RMS of the residual stream on text: where a pretrained model keeps its massive activations.

Real checkpoints carry a few hidden dimensions whose activations are orders of magnitude above the rest (SmolLM2-135M:
one dimension near RMS 1000 in the middle layers against a median of about 10). Under RMSNorm such a dimension
dominates every token's normalisation, so an operator that gives it a multiplicity other than the average changes the
whole function. Weight statistics do not show it plainly; running the model does. The stream is measured at the
embedding output and after every block, with hooks on the blocks (found from the family's tensor names).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from growkit.arch.moe import EXPERTS, MoeSizes
from growkit.arch.spec import Sizes, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.operators.importance import block_prefix, calibration_ids, token_blocks

#: A dimension is an outlier where its RMS exceeds this many times the median dimension's RMS at that point.
OUTLIER_RATIO = 10.0
DEFAULT_TOKENS = 2048


class OutlierDim(BaseModel):
    """One hidden dimension that stands out of the residual stream, and where."""

    dim: int
    points: list[int]  # indices into ResidualStream.points where its RMS exceeds the ratio x median
    where: str  # the same as text, e.g. "blocks 3-29" or "embedding, blocks 0-5"
    peak_rms: float  # its RMS where it stands out most (the largest ratio to the median), at `peak_point`
    peak_point: int
    median_at_peak: float
    max_abs: float


class ResidualStream(BaseModel):
    """RMS of every hidden dimension at every point of the residual stream, on the tokens described in `tokens`."""

    tokens: str
    token_count: int
    points: list[str]  # "embedding", "block 0", ...: the stream after each
    median_rms: list[float]
    max_rms: list[float]
    argmax_dim: list[int]
    max_abs: list[float]
    outlier_ratio: float
    outliers: list[OutlierDim]
    rms: list[list[float]]  # [point][dim]


class RouterLoad(BaseModel):
    """Per MoE layer, the share of the (token, top-k slot) assignments each routed expert receives on the tokens of
    the residual-stream pass: each row sums to 1; a balanced router gives 1/experts everywhere."""

    top_k: int
    fractions: list[list[float]]  # [layer][expert]
    max_over_mean: list[float]  # per layer: the busiest expert's share x experts (1 = balanced)


def _router_load(counts: torch.Tensor, top_k: int) -> RouterLoad:
    fractions = counts / counts.sum(dim=1, keepdim=True)
    return RouterLoad(top_k=top_k, fractions=fractions.tolist(),
                      max_over_mean=(fractions.amax(dim=1) * counts.shape[1]).tolist())


def stream_tokens(ckpt: Checkpoint, calibration: Sequence[str | Path] | None, max_tokens: int, seq_len: int,
                  vocab: int, seed: int) -> tuple[torch.Tensor, str]:
    """[n, seq_len] token blocks and what they are: the calibration text in the checkpoint's tokenizer, or, without
    any, uniformly random tokens (which show the massive dimensions too, since those live in the weights)."""
    if calibration:
        ids = calibration_ids(list(calibration), ckpt.root, max_tokens)
        names = ", ".join(Path(c).name for c in calibration)
        return token_blocks(ids, seq_len), f"calibration text {names}"
    gen = torch.Generator().manual_seed(seed)
    n = max(1, max_tokens // seq_len)
    return torch.randint(vocab, (n, seq_len), generator=gen), f"random tokens (no calibration text given), seed {seed}"


def _span(points: list[int], labels: list[str]) -> str:
    """[0, 1, 2, 5] with labels embedding, block 0, ... -> 'embedding, blocks 0-1, 4'."""
    parts: list[str] = []
    blocks = [p - 1 for p in points if p > 0]
    if 0 in points:
        parts.append(labels[0])
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    if runs:
        text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
        parts.append(("block " if len(blocks) == 1 else "blocks ") + text)
    return ", ".join(parts)


def outliers(rms: torch.Tensor, max_abs: torch.Tensor, labels: list[str],
             ratio: float = OUTLIER_RATIO) -> list[OutlierDim]:
    """Dimensions whose RMS exceeds `ratio` x the median dimension's at some point, with the point where they stand
    out most; the most outstanding first."""
    median = rms.median(dim=1).values
    above = rms > ratio * median[:, None]
    found = []
    for d in above.any(dim=0).nonzero().flatten().tolist():
        points = above[:, d].nonzero().flatten().tolist()
        peak = int((rms[:, d] / median).argmax())  # where it stands out most
        found.append(OutlierDim(dim=d, points=points, where=_span(points, labels), peak_rms=float(rms[peak, d]),
                                peak_point=peak, median_at_peak=float(median[peak]),
                                max_abs=float(max_abs[:, d].max())))
    return sorted(found, key=lambda o: -o.peak_rms / o.median_at_peak)


@torch.no_grad()
def residual_stream(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes,
                    calibration: Sequence[str | Path] | None = None, max_tokens: int = DEFAULT_TOKENS,
                    seed: int = 0, batch_size: int = 4) -> tuple[ResidualStream, RouterLoad | None]:
    """Run the checkpoint (fp32, on the CPU) on calibration text or random tokens and measure the stream, and, for a
    MoE model, which experts its routers pick on those tokens (None for a dense model)."""
    from growkit.verify import model_from_checkpoint

    tokens, what = stream_tokens(ckpt, calibration, max_tokens, min(256, sizes.positions or 256), sizes.vocab, seed)
    model = model_from_checkpoint(ckpt)
    prefix = block_prefix(specs)
    points = sizes.layers + 1
    sq = torch.zeros(points, sizes.hidden, dtype=torch.float64)
    peak = torch.zeros(points, sizes.hidden)

    def record(point: int, h: torch.Tensor) -> None:
        h = h.reshape(-1, sizes.hidden).float()
        sq[point] += (h.double() ** 2).sum(0)
        torch.maximum(peak[point], h.abs().amax(0), out=peak[point])

    def before_first(module: Any, args: tuple, kwargs: dict) -> None:
        record(0, args[0] if args else kwargs["hidden_states"])

    def after(layer: int) -> Any:
        def hook(module: Any, args: tuple, out: Any) -> None:
            record(layer + 1, out[0] if isinstance(out, tuple) else out)
        return hook

    blocks = [model.get_submodule(prefix.format(layer)) for layer in range(sizes.layers)]
    handles = [blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [block.register_forward_hook(after(layer)) for layer, block in enumerate(blocks)]
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0) if isinstance(sizes, MoeSizes) else 0
    picks = torch.zeros(sizes.layers, sizes.axis(EXPERTS) if top_k else 0, dtype=torch.float64)
    try:
        for batch in tokens.split(batch_size):
            if not top_k:
                model(input_ids=batch)
                continue
            for layer, logits in enumerate(model(input_ids=batch, output_router_logits=True).router_logits):
                picks[layer] += torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=picks.shape[1])
    finally:
        for handle in handles:
            handle.remove()
    rms = (sq / tokens.numel()).sqrt().float()
    labels = ["embedding", *(f"block {layer}" for layer in range(sizes.layers))]
    stream = ResidualStream(tokens=what, token_count=tokens.numel(), points=labels,
                          median_rms=rms.median(dim=1).values.tolist(), max_rms=rms.max(dim=1).values.tolist(),
                          argmax_dim=rms.argmax(dim=1).tolist(), max_abs=peak.max(dim=1).values.tolist(),
                          outlier_ratio=OUTLIER_RATIO, outliers=outliers(rms, peak, labels),
                          rms=rms.tolist())
    return stream, (_router_load(picks, top_k) if top_k else None)
