"""Sparse upcycling as axis maps: a dense FFN becomes E routed experts (and shared ones) made of its neurons.

The dense FFN is a sum over its neurons, so it is a sum over any partition of them into G slices of ffn/G neurons.
Expert e is copy `e // R` of routed slice `S + e % R` (S shared slices, R = G - S routed ones, C = E / R copies), so
each expert's map on the `ffn` axis picks one slice, and its readers (down_proj columns) carry the factor that makes
the routed mixture add back up to the dense FFN:

- the router gives the R experts of one copy the same row (a "virtual group"), so their logits tie and a top-k with
  K a multiple of R takes whole copies; renormalised weights then sum to 1 over the copies taken, each copy's slices
  add up to the FFN, and down_proj x R makes the sum exact. G = 1 is plain upcycling (identical experts);
- unnormalised top-k weights (Qwen2-MoE's `norm_topk_prob=False`) sum to the K chosen probabilities instead of 1:
  constant K / E only when every logit ties (zero router), so down_proj x E / K is exact there and approximate
  otherwise;
- the shared slices form the shared expert; its gate starts at zero, sigmoid(0) = 1/2, so its down_proj is x 2.

Nothing here touches a tensor: `growkit.apply` turns these decisions into weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from growkit.arch.moe import LAYOUTS, MoeLayout, targets_for
from growkit.arch.spec import Sizes
from growkit.errors import GrowkitError
from growkit.maps import AxisMap

RouterInit = Literal["random", "zero"]
ROUTER_INITS: tuple[str, ...] = ("random", "zero")

ROUTER_HELP = {
    "random": "each copy of the FFN gets one Gaussian router row (std --router-std), shared by its R slices: tokens "
              "spread over the experts from step 0, and the routed sum is exact for any routing",
    "zero": "every logit is 0: all experts tie and top-k takes the first K by index (every token the same experts) "
            "until training moves the router; exact only where every expert that can be taken is a whole copy",
}


@dataclass(frozen=True)
class UpcycleRequest:
    """What the user asked, before it is checked against the model."""

    experts: int
    top_k: int
    to: str | None = None
    granularity: int = 1
    shared_experts: int = 0
    router: str = "random"
    router_std: float | None = None
    expert_noise_db: float | None = None
    reinit_ratio: float = 0.0
    normalise_topk: bool = True


@dataclass
class UpcyclePlan:
    """Every decision of one upcycling, made from sizes and the request alone."""

    layout: MoeLayout
    request: UpcycleRequest
    source: Sizes
    expert_ffn: int
    shared_ffn: int
    copies: int
    routed_slices: int
    expert_maps: list[AxisMap]  # routed expert e's map on the dense ffn axis
    shared_map: AxisMap | None  # None: a silent shared expert (Qwen2-MoE always has one)
    router_groups: list[int]  # the copy each routed expert belongs to (its router row)
    exact: bool
    notes: list[str] = field(default_factory=list)  # why the step-0 model is not exactly the dense one
    #: a MoE source's experts kept or copied: per layer, the source expert (and router row) each new expert copies
    layer_sources: list[list[int]] = field(default_factory=list)

    def active_ffn(self) -> int:
        """FFN neurons each token passes through: K routed experts and the shared expert."""
        return self.request.top_k * self.expert_ffn + self.shared_ffn

    def reinit_positions(self, gen: torch.Generator) -> torch.Tensor:
        """Drop-Upcycling: which of one expert's neurons are re-drawn (a fresh random subset per expert and layer)."""
        n = round(self.request.reinit_ratio * self.expert_ffn)
        return torch.randperm(self.expert_ffn, generator=gen)[:n].sort().values


def _target(dense_type: str, to: str | None) -> MoeLayout:
    choices = targets_for(dense_type)
    if not choices:
        supported = sorted({t for layout in LAYOUTS.values() for t in layout.dense_types})
        raise GrowkitError(f"cannot upcycle a {dense_type} model; growkit upcycles {', '.join(supported)}")
    if to is None:
        if len(choices) > 1:
            raise GrowkitError(f"a {dense_type} model upcycles into {' or '.join(choices)}: choose one with --to")
        return LAYOUTS[choices[0]]
    if to not in choices:
        raise GrowkitError(f"--to {to}: a {dense_type} model upcycles into {', '.join(choices)}")
    return LAYOUTS[to]


def _check_counts(r: UpcycleRequest, layout: MoeLayout, ffn: int) -> None:
    if r.experts < 1 or r.top_k < 1 or r.top_k > r.experts:
        raise GrowkitError(f"--top-k {r.top_k} must be from 1 to --experts {r.experts}")
    if r.granularity < 1 or ffn % r.granularity:
        raise GrowkitError(f"--granularity {r.granularity} must divide the FFN size {ffn} into whole slices")
    if r.shared_experts < 0 or (r.shared_experts and r.shared_experts >= r.granularity):
        raise GrowkitError(f"--shared-experts {r.shared_experts} must be less than --granularity {r.granularity} "
                           "(the shared slices and at least one routed slice make up the FFN)")
    if r.shared_experts and not layout.shared:
        raise GrowkitError(f"--shared-experts: {layout.model_type} has no shared expert (qwen2_moe has one)")
    routed = r.granularity - r.shared_experts
    if r.experts % routed:
        raise GrowkitError(f"--experts {r.experts} must be a multiple of the {routed} routed slices "
                           f"(--granularity {r.granularity} minus --shared-experts {r.shared_experts}), so every "
                           "expert copy holds the whole routed FFN")
    if routed > 1 and r.top_k % routed:
        raise GrowkitError(f"--top-k {r.top_k} must be a multiple of the {routed} routed slices, so each token "
                           "takes whole copies of the FFN")
    if r.router not in ROUTER_INITS:
        raise GrowkitError(f"--router {r.router!r}: choose one of {', '.join(ROUTER_INITS)}")
    if r.router == "zero" and routed > 1 and r.top_k < r.experts:
        raise GrowkitError(f"--router zero with {routed} routed slices per copy: every logit ties and top-k would "
                           f"pick {r.top_k} of {r.experts} experts by index, not whole copies; use --router random "
                           "or --top-k equal to --experts")
    if not 0.0 <= r.reinit_ratio < 1.0 or not math.isfinite(r.reinit_ratio):
        raise GrowkitError(f"--reinit-ratio {r.reinit_ratio} must be at least 0 and less than 1")
    if r.expert_noise_db is not None and (not math.isfinite(r.expert_noise_db) or r.expert_noise_db < 0):
        raise GrowkitError(f"--expert-noise must be a finite signal-to-noise ratio of at least 0 dB, got "
                           f"{r.expert_noise_db}")
    if r.expert_noise_db is not None and r.experts // routed < 2:
        raise GrowkitError("--expert-noise needs at least two copies of each slice to cancel over "
                           f"(--experts {r.experts} holds {r.experts // routed})")
    if r.router_std is not None and (not math.isfinite(r.router_std) or r.router_std <= 0):
        raise GrowkitError(f"--router-std must be a positive number, got {r.router_std}")
    if not r.normalise_topk and layout.topk_norm_key is None:
        raise GrowkitError(f"--no-norm-topk-prob: {layout.model_type} always renormalises its top-k weights")


def plan_upcycle(dense_type: str, source: Sizes, request: UpcycleRequest) -> UpcyclePlan:
    """Check a request against the dense model's sizes and decide every expert's neurons and scale."""
    layout = _target(dense_type, request.to)
    _check_counts(request, layout, source.ffn)
    g, s = request.granularity, request.shared_experts
    routed = g - s
    slice_size = source.ffn // g
    copies = request.experts // routed
    normalised = request.normalise_topk
    # Unnormalised weights of tied logits are 1/E each, K of them: x E/K brings the routed sum back to the FFN.
    factor = float(routed) * (1.0 if normalised else request.experts / request.top_k)

    def slice_map(first: int, count: int, scale: float) -> AxisMap:
        src = torch.arange(first * slice_size, (first + count) * slice_size)
        return AxisMap(source.ffn, src, scale=torch.full((src.numel(),), scale))

    expert_maps = [slice_map(s + e % routed, 1, factor) for e in range(request.experts)]
    shared_map = slice_map(0, s, 2.0) if s else None
    notes: list[str] = []
    all_taken = request.top_k == request.experts
    if not normalised and request.router == "random" and not all_taken:
        notes.append("unnormalised top-k weights (--no-norm-topk-prob) sum to the chosen experts' probabilities, "
                     f"which a random router makes vary around {request.top_k}/{request.experts} per token")
    if request.expert_noise_db is not None and not (all_taken and request.router == "zero"):
        notes.append("--expert-noise cancels over the copies of a slice only when a token takes every copy with "
                     "equal weight (--router zero and --top-k equal to --experts)")
    if request.reinit_ratio > 0:
        notes.append(f"--reinit-ratio {request.reinit_ratio:g} re-draws that share of every expert's neurons")
    return UpcyclePlan(layout=layout, request=request, source=source, expert_ffn=slice_size,
                       shared_ffn=s * slice_size if s else (slice_size if layout.shared else 0), copies=copies,
                       routed_slices=routed, expert_maps=expert_maps, shared_map=shared_map,
                       router_groups=[e // routed for e in range(request.experts)], exact=not notes, notes=notes)


def exact_top_k(top_k_source: int, experts_source: int, experts: int) -> int:
    """The top-k that keeps a duplication to `experts` exact (`plan_duplication`): the source's times the copies."""
    return top_k_source * max(1, experts // experts_source)


def plan_duplication(layout: MoeLayout, source: Sizes, experts: int, top_k_source: int,
                     request: UpcycleRequest) -> UpcyclePlan:
    """More experts for a MoE model: each source expert copied m = N / E times, its router row with it.

    The m copies of an expert have equal logits, so a top-k of m x K takes all copies of the K experts the source
    took; each copy's weight is the source weight / m, renormalised or not (softmax over N logits with m-fold
    ties gives each copy p / m), so the mixture is exactly the source's. Any other top-k splits copies: announced.
    Expert noise cancels exactly here whenever top-k is m x K, because all copies of an expert are taken together.
    """
    defaults = UpcycleRequest(experts=request.experts, top_k=request.top_k, to=request.to,
                              expert_noise_db=request.expert_noise_db, normalise_topk=request.normalise_topk)
    if request != defaults or not request.normalise_topk:
        raise GrowkitError("--granularity, --shared-experts, --router, --router-std, --reinit-ratio and "
                           "--no-norm-topk-prob apply to dense sources; a MoE source's experts are copied whole")
    if request.to not in (None, layout.model_type):
        raise GrowkitError(f"--to {request.to}: a {layout.model_type} model stays {layout.model_type}")
    if request.experts <= experts or request.experts % experts:
        raise GrowkitError(f"--experts {request.experts}: a MoE source with {experts} experts grows to a multiple "
                           f"of {experts} (each expert copied the same number of times; growkit shrink --experts gives it fewer)")
    copies = request.experts // experts
    if request.expert_noise_db is not None and (not math.isfinite(request.expert_noise_db)
                                                or request.expert_noise_db < 0):
        raise GrowkitError(f"--expert-noise must be a finite signal-to-noise ratio of at least 0 dB, got "
                           f"{request.expert_noise_db}")
    if not 1 <= request.top_k <= request.experts:
        raise GrowkitError(f"--top-k {request.top_k} must be from 1 to --experts {request.experts}")
    notes = []
    if request.top_k != copies * top_k_source:
        notes.append(f"--top-k {request.top_k} is not {copies} copies x the source's top-{top_k_source}, so a token's "
                     "experts differ from the source's")
    identity = AxisMap.identity(source.ffn)
    groups = [e % experts for e in range(request.experts)]
    return UpcyclePlan(layout=layout, request=request, source=source, expert_ffn=source.ffn,
                       shared_ffn=getattr(source, "shared_ffn", 0), copies=copies, routed_slices=experts,
                       expert_maps=[identity] * request.experts, shared_map=None,
                       router_groups=groups, exact=not notes, notes=notes, layer_sources=[groups] * source.layers)
