"""Fewer routed experts for a MoE model: which experts each layer keeps, and when that keeps the function.

The kept experts are an `UpcyclePlan` like the one that duplicates experts: per layer, the source expert each new
expert (and its router row) copies. So one plan and one writer (`growkit.upcycle.ExpertSelection`) give a MoE model
more experts (each copied) or fewer (a subset).

Exact cases, found from the weights:
- **copies**: experts whose weights and router rows are identical (what `upcycle --experts` duplication makes) form
  a group; softmax over m-fold tied logits gives each copy p / m. Keeping 1/r of every group (r = E / N) with top-k
  K / r is the inverse of duplication: a token's kept copies get r times the weight of its source copies, and there
  are r times fewer of them, renormalised top-k or not. It needs r to divide every group's size and K.
- **interchangeable experts**: all experts of a layer identical (a fresh `upcycle` at granularity 1, whatever its
  router) and renormalised top-k weights: every token's output is that one expert's, whichever experts are kept.
Anything else drops what some tokens used: the most important experts are kept, and the gap is announced.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from growkit.arch.moe import DENSE_PROJECTIONS, MoeLayout
from growkit.arch.spec import Sizes
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap
from growkit.operators.importance import calibration_ids, expert_activity, token_blocks
from growkit.operators.shrink import keep_top, strided
from growkit.operators.upcycle import UpcyclePlan, UpcycleRequest


@dataclass(frozen=True)
class LayerExperts:
    """One layer's routed experts as read: each expert's group of identical copies (weights and router row), and
    whether every expert has the same weights."""

    groups: list[int]
    same_weights: bool


def read_layer_experts(ckpt: Checkpoint, layout: MoeLayout, layer: int, experts: int) -> LayerExperts:
    """Group a layer's experts into identical copies, compared bit for bit (a copy made by growkit is one).

    Expert tensors are read only where a comparison needs them (router rows first): experts with distinct router
    rows, as in a trained model, cost no reading beyond the first tensor that differs from expert 0's."""
    router = ckpt.get(layout.router().format(layer))
    read: dict[tuple[int, str], torch.Tensor] = {}

    def weight(e: int, projection: str) -> torch.Tensor:
        if (e, projection) not in read:
            read[(e, projection)] = ckpt.get(layout.expert(e, projection).format(layer))
        return read[(e, projection)]

    def same(a: int, b: int) -> bool:
        return all(torch.equal(weight(a, p), weight(b, p)) for p in DENSE_PROJECTIONS)

    groups: list[int] = []
    first: list[int] = []  # the first expert of each group
    for e in range(experts):
        g = next((g for g, f in enumerate(first) if torch.equal(router[e], router[f]) and same(e, f)), None)
        if g is None:
            first.append(e)
            g = len(first) - 1
        groups.append(g)
    return LayerExperts(groups, all(same(0, e) for e in range(1, experts)))


def weight_scores(ckpt: Checkpoint, layout: MoeLayout, layer: int, experts: int, groups: list[int]) -> torch.Tensor:
    """Without calibration text: ||router row|| x ||gate|| x ||up|| x ||down|| of each expert (the scale of what it
    writes when chosen, and how strongly it is chosen), divided by its number of identical copies, which share the
    tokens one expert would get."""
    router = ckpt.get(layout.router().format(layer)).float()
    size = torch.bincount(torch.tensor(groups))
    return torch.tensor([float(router[e].norm()) * math.prod(
        float(ckpt.get(layout.expert(e, p).format(layer)).float().norm()) for p in DENSE_PROJECTIONS)
        / int(size[groups[e]]) for e in range(experts)])


@dataclass
class ExpertRanking:
    """How `shrink --experts` ranks experts where keeping copies is not exact: `method` "subclone" by importance
    (activations on `calibration` text, as `--method subclone` measures neurons; weight norms without it, announced),
    "select" evenly strided. `used` says which it was once `scores` has run."""

    method: str
    calibration: list[str | Path] = field(default_factory=list)
    tokenizer: str | Path | None = None
    calibration_tokens: int = 8192
    seq_len: int = 256

    @property
    def used(self) -> str:
        return "strided" if self.method == "select" else "activations" if self.calibration else "weights"

    def scores(self, ckpt: Checkpoint, layout: MoeLayout, sizes: Sizes, layers: Sequence[LayerExperts]
               ) -> list[torch.Tensor]:
        """Each layer's expert scores (`ExpertActivity.score`, or `weight_scores`)."""
        experts = len(layers[0].groups)
        if not self.calibration:
            print("growkit: warning: no calibration text; shrink --experts ranks experts by router row and weight "
                  "norms (--calibration FILES ranks them by the routed weight and output they get on real text)",
                  file=sys.stderr)
            return [weight_scores(ckpt, layout, layer, experts, lay.groups) for layer, lay in enumerate(layers)]
        tokenizer = self.tokenizer if self.tokenizer is not None else ckpt.root
        ids = calibration_ids(self.calibration, tokenizer, self.calibration_tokens, sizes.vocab)
        blocks = token_blocks(ids, min(self.seq_len, sizes.positions or self.seq_len))
        return list(expert_activity(ckpt, sizes, experts, blocks).score)


def copies_to_keep(groups: list[int], ratio: int) -> list[int] | None:
    """The first 1/`ratio` of every group of copies, in index order, or None when a group's size is not a multiple
    of `ratio`."""
    members: dict[int, list[int]] = {}
    for e, g in enumerate(groups):
        members.setdefault(g, []).append(e)
    if any(len(m) % ratio for m in members.values()):
        return None
    return sorted(e for m in members.values() for e in m[: len(m) // ratio])


def plan_selection(layout: MoeLayout, source: Sizes, experts: int, top_k_source: int, normalised: bool,
                   request: UpcycleRequest, layers: Sequence[LayerExperts],
                   rank: Callable[[], Sequence[torch.Tensor]] | None) -> tuple[UpcyclePlan, bool]:
    """Keep `request.experts` of each layer's `experts`: whole groups' shares of copies where that is exact, else the
    highest scores `rank()` gives per layer (called only then; None: evenly strided, `--method select`), and whether
    copies were kept. `request.top_k` 0 means the default: K / r for copies, else the source's K (refused where it
    exceeds the kept experts)."""
    n = request.experts
    if not 1 <= n < experts:
        raise GrowkitError(f"--experts {n}: a MoE source with {experts} experts shrinks to 1 to {experts - 1}")
    ratio = experts // n if experts % n == 0 else 0
    kept = [copies_to_keep(lay.groups, ratio) if ratio and top_k_source % ratio == 0 else None for lay in layers]
    by_copies = all(k is not None for k in kept)
    top_k = request.top_k or (top_k_source // ratio if by_copies else top_k_source)
    if not 1 <= top_k <= n:
        raise GrowkitError(f"--top-k {top_k} must be from 1 to --experts {n}"
                           + ("" if request.top_k else f" (the source's top-{top_k_source} is kept by default; "
                                                       "pass --top-k)"))
    if by_copies:
        sources = [k for k in kept if k is not None]
    elif rank is None:
        sources = [strided(experts, n).tolist() for _ in layers]
    else:
        sources = [keep_top(s, n).tolist() for s in rank()]
    interchangeable = normalised and all(lay.same_weights for lay in layers)
    notes = []
    if not interchangeable and not (by_copies and top_k == top_k_source // ratio):
        notes.append(_why_inexact(by_copies, ratio, top_k_source, normalised, layers))
    plan = UpcyclePlan(layout=layout, request=UpcycleRequest(experts=n, top_k=top_k), source=source,
                       expert_ffn=source.ffn, shared_ffn=getattr(source, "shared_ffn", 0), copies=1,
                       routed_slices=experts, expert_maps=[AxisMap.identity(source.ffn)] * n, shared_map=None,
                       router_groups=[], exact=not notes, notes=notes, layer_sources=sources)
    return plan, by_copies


def _why_inexact(by_copies: bool, ratio: int, top_k: int, normalised: bool, layers: Sequence[LayerExperts]) -> str:
    if by_copies:
        return f"--top-k is not the source's top-{top_k} / {ratio}, so a token's kept copies differ from the source's"
    if all(lay.same_weights for lay in layers) and not normalised:
        return "the experts are identical but the top-k weights are not renormalised, so dropping experts changes them"
    return ("the dropped experts are not copies of kept ones (growkit compares weights and router rows), so tokens "
            "routed to them get other experts")
