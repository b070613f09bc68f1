"""Operators that choose which neurons to keep: `subclone` (ranked by importance) and `select` (evenly strided).

In the RC view shrinking is sampling fewer labels: `select` samples them on a fixed stride, `subclone` keeps the
labels that carry the most (weight subcloning). An axis map for a shrink is just `src` = the kept indices in their
original order, the same on every tensor of the axis, so every reader and writer of a kept neuron stays paired.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from growkit.arch.spec import FFN, HIDDEN, KV_HEADS, PER_LAYER, QGROUP, Family, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError
from growkit.maps import AxisMap, GrowthMaps
from growkit.operators.base import Candidates, Operator, stream_exact
from growkit.operators.depth import depth_map
from growkit.operators.importance import (
    Importance, ModelParts, activation_importance, calibration_ids, token_blocks, weight_importance,
)
from growkit.plan import GrowthPlan

#: Where "fanin" rescales a reader's kept fan-in: the residual stream (once), each FFN, each attention output.
FANIN_SITES = ("stream", "ffn", "attn")
RESCALE_MODES = ("none", "norm", "fanin")
#: Every fixed rescale: "none", "norm" (norm gains only), and the norm gains with fan-in at a subset of the sites
#: ("fanin:stream+ffn"; "fanin" is all three). rescale="auto" tries each and keeps the one with the lowest loss.
RESCALE_CANDIDATES = ("none", "norm", *(f"fanin:{'+'.join(c)}" for k in (1, 2)
                                        for c in itertools.combinations(FANIN_SITES, k)), "fanin")
#: What `rescale` accepts: a fixed mode (one of the candidates), or "auto" (the candidate whose shrunk model has the
#: lowest loss on held-out calibration tokens; the default when calibration text is given).
RESCALE_CHOICES = ("auto", *RESCALE_MODES, "fanin:SITES")
#: Without calibration text: lowest loss right after a 0.5x width shrink in benchmarks/bench_shrink.py.
FALLBACK_RESCALE = "fanin"
IMPORTANCE_SOURCES = ("activations", "weights")


def strided(old: int, new: int) -> torch.Tensor:
    """`new` evenly strided indices out of `old` (0, old/new, 2 old/new, ...), the weight-selection baseline."""
    return (torch.arange(new) * old) // new


def keep_top(score: torch.Tensor, new: int) -> torch.Tensor:
    """The `new` highest-scoring indices in their original order (ties go to the lower index)."""
    order = torch.sort(-score.double(), stable=True).indices
    return torch.sort(order[:new]).values


def ranked_fill(score: torch.Tensor, new: int) -> torch.Tensor:
    """Growth by ranked duplication: every neuron once, then copies of the top-ranked ones (cycling) up to `new`."""
    old = score.numel()
    order = torch.sort(-score.double(), stable=True).indices
    extra = order.repeat(math.ceil(max(new - old, 0) / old))[: new - old]
    return torch.cat([torch.arange(old), extra])


def default_rescale(calibrated: bool) -> str:
    """"auto" when there is calibration text to measure the candidates on, else the fixed fallback."""
    return "auto" if calibrated else FALLBACK_RESCALE


def fanin_sites(rescale: str) -> frozenset[str] | None:
    """The fan-in sites a rescale mode corrects (None: not even the norm gains); a GrowkitError for a bad mode."""
    if rescale == "none":
        return None
    if rescale in ("norm", "fanin"):
        return frozenset(() if rescale == "norm" else FANIN_SITES)
    sites = rescale.removeprefix("fanin:").split("+")
    if not rescale.startswith("fanin:") or not set(sites) <= set(FANIN_SITES) or len(set(sites)) != len(sites):
        raise GrowkitError(f"subclone: rescale must be one of {', '.join(RESCALE_CHOICES)} (SITES: a +-joined "
                           f"subset of {', '.join(FANIN_SITES)}), got {rescale!r}")
    return frozenset(sites)


def _check_shrink(plan: GrowthPlan, name: str) -> None:
    if plan.direction == "shrink" and plan.source == plan.target:
        raise GrowkitError(f"--method {name}: nothing to shrink, the target sizes equal the source's "
                           "(give --width, --hidden/--ffn/--heads/--kv-heads or --layers)")


class Select(Operator):
    """Weight selection: evenly strided neurons on every axis (0, old/new, 2 old/new, ...), whole heads (whole GQA
    groups, and the same query slots in each), evenly strided layers starting with the first; no data needed."""

    name = "select"
    directions = ("shrink",)

    def check(self, plan: GrowthPlan) -> None:
        super().check(plan)
        _check_shrink(plan, self.name)

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        return AxisMap.identity(old) if new == old else AxisMap(old, strided(old, new))

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps:
        gen = torch.Generator().manual_seed(seed)
        layer_src = strided(plan.source.layers, plan.target.layers).tolist()
        hidden = self.axis_map(HIDDEN, plan.source.hidden, plan.target.hidden, gen)
        per_layer = {(kind, layer): self.axis_map(kind, plan.source.axis(kind), plan.target.axis(kind), gen)
                     for layer in range(plan.target.layers) for kind in PER_LAYER}
        return GrowthMaps(hidden=hidden, per_layer=per_layer, layer_src=layer_src)


class Subclone(Operator):
    """Weight subcloning: keep the most important neurons, heads (whole GQA groups) and blocks; grow by duplicating
    the top-ranked ones.

    `calibration`: text files run through the source model (with the checkpoint's own tokenizer, or `tokenizer`) to
    measure importance from activations; without them, weight norms are used and a warning says so.
    `rescale` (shrinking only): "none" keeps the kept weights as they are; "norm" multiplies each hidden-axis norm
    gain by the measured ratio of the norm's statistic over the kept coordinates to that over all, so the kept
    coordinates of every normalised stream keep their source scale; "fanin" does that and also multiplies each
    reader's kept fan-in by sqrt(source energy / kept energy) (per FFN, per attention output, and once for the
    residual stream), so the readers' outputs keep their source scale; "fanin:SITES" applies the fan-in factor at
    some of those sites only (e.g. "fanin:stream+ffn"). No fixed mode wins everywhere (benchmarks/RESULTS.md), so
    the default with calibration text is "auto": every candidate in `RESCALE_CANDIDATES` is written in turn into one
    in-memory model of the target shape (all from the one importance measurement) and the one with the lowest
    next-token loss on held-out calibration tokens is kept. Those are the `heldout_tokens` tokens that follow the
    `calibration_tokens` used for ranking, so ranking never sees them (if the text ends sooner, its last quarter, at
    most `heldout_tokens`, is held out and the rest ranks). The choice and every candidate's loss are printed and
    recorded in the provenance. Without calibration there are no norm statistics and nothing to measure on: the
    gain correction is skipped and the default is "fanin", with the weight-norm scores squared as energies.
    """

    name = "subclone"
    exact = True
    directions = ("grow", "shrink")

    def __init__(self, calibration: Sequence[str | Path] | str | None = None, tokenizer: str | Path | None = None,
                 calibration_tokens: int = 8192, seq_len: int = 256, rescale: str | None = None,
                 importance: str | None = None, heldout_tokens: int = 1024) -> None:
        if isinstance(calibration, (str, Path)):
            calibration = [calibration]
        self.calibration = [str(c) for c in calibration or []]
        self.tokenizer = tokenizer
        self.calibration_tokens = int(calibration_tokens)
        self.heldout_tokens = int(heldout_tokens)
        self.seq_len = int(seq_len)
        self.rescale = rescale if rescale is not None else default_rescale(bool(self.calibration))
        if self.rescale == "auto" and not self.calibration:
            raise GrowkitError("subclone: rescale auto picks the mode by its loss on held-out calibration text; pass "
                               f"--calibration FILES or a fixed mode ({', '.join(RESCALE_MODES)})")
        if self.rescale != "auto":
            fanin_sites(self.rescale)  # a bad mode fails here, before any tensor is read
        self.importance_source = importance or ("activations" if self.calibration else "weights")
        if self.importance_source not in IMPORTANCE_SOURCES:
            raise GrowkitError(f"subclone: importance must be one of {', '.join(IMPORTANCE_SOURCES)}")
        if self.importance_source == "activations" and not self.calibration:
            raise GrowkitError("subclone: activation importance needs calibration text (--calibration FILES)")
        if self.calibration_tokens < 2 or self.seq_len < 2 or self.heldout_tokens < 2:
            raise GrowkitError("subclone: calibration_tokens, heldout_tokens and seq_len must be at least 2")
        self.scores: Importance | None = None
        #: rescale="auto" when shrinking: the held-out blocks, each mode's loss on them, and the mode kept
        self.heldout: torch.Tensor | None = None
        self.rescale_losses: dict[str, float] = {}
        self.rescale_chosen: str | None = None
        self.shrinking = False  # set by build_maps: rescale means nothing to a growth
        self.instances: dict[str, str] = {}  # set by build_maps: a MoE model's experts, each its own ffn maps

    def settings(self) -> dict[str, Any]:
        """The rescale mode asked for (shrinking only); with "auto", the one kept and every candidate's loss."""
        if not self.shrinking:
            return {}
        settings: dict[str, Any] = {"rescale": self.rescale}
        if self.rescale_chosen is not None:
            settings["rescale_chosen"] = self.rescale_chosen
        if self.rescale_losses and self.heldout is not None:
            settings["rescale_losses"] = {m: round(v, 6) for m, v in self.rescale_losses.items()}
            settings["rescale_heldout_tokens"] = int(self.heldout.numel())
        return settings

    def check(self, plan: GrowthPlan) -> None:
        super().check(plan)
        _check_shrink(plan, self.name)

    def measure(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                seed: int = 0) -> Importance:
        """Importance scores of the source model (activations on the calibration text, or weight norms)."""
        parts = ModelParts.of(specs)
        seq_len = min(self.seq_len, plan.source.positions or self.seq_len)
        if self.importance_source == "weights":
            removes_blocks = plan.target.layers < plan.source.layers
            why = "importance=weights" if self.calibration else "no calibration text"
            print(f"growkit: warning: {why}; subclone ranks neurons by weight norms"
                  + (" and blocks by their update on random token ids" if removes_blocks else "")
                  + "; ranking by activations on real text (--calibration FILES) kept more than --method select in "
                  "benchmarks/bench_shrink.py, weight norms kept less", file=sys.stderr)
            imp = weight_importance(ckpt, specs, plan.source, parts)
            if removes_blocks:
                # Weight norms say nothing about how much a block changes the stream (the first block, which turns
                # embeddings into features, has small writers yet the largest relative update); random ids do.
                gen = torch.Generator().manual_seed(seed)
                ids = torch.randint(plan.source.vocab, (max(1, self.calibration_tokens // seq_len), seq_len),
                                    generator=gen)
                imp.blocks = activation_importance(ckpt, specs, plan.source, parts, ids).blocks
            return imp
        return activation_importance(ckpt, specs, plan.source, parts, self.calibration_blocks(ckpt, plan))

    def calibration_blocks(self, ckpt: Checkpoint, plan: GrowthPlan) -> torch.Tensor:
        """The ranking tokens as [n, seq_len] blocks; with rescale="auto" (shrinking) also sets `self.heldout`, the
        tokens after them, which ranking never sees."""
        seq_len = min(self.seq_len, plan.source.positions or self.seq_len)
        auto = self.rescale == "auto" and plan.direction == "shrink"
        tokenizer = self.tokenizer if self.tokenizer is not None else ckpt.root
        budget = self.calibration_tokens + (self.heldout_tokens if auto else 0)
        ids = calibration_ids(self.calibration, tokenizer, budget, plan.source.vocab)
        if not auto:
            return token_blocks(ids, seq_len)
        held = self.heldout_tokens if len(ids) == budget else min(self.heldout_tokens, len(ids) // 4)
        if held < 2:
            raise GrowkitError(f"calibration text gives {len(ids)} tokens; rescale auto needs at least 8 "
                               "(pass more text or a fixed --rescale mode)")
        rank = ids[: len(ids) - held]
        self.heldout = token_blocks(ids[len(rank):], seq_len)
        if len(ids) < budget:
            print(f"growkit: note: the calibration text gives {len(ids)} tokens, fewer than calibration_tokens + "
                  f"heldout_tokens = {budget}; rescale auto ranks on the first {len(rank)} and measures the modes "
                  f"on {self.heldout.numel()} of the last {held}", file=sys.stderr)
        return token_blocks(rank, seq_len)

    def build_maps(self, ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                   seed: int) -> GrowthMaps | Candidates:
        imp = self.scores = self.measure(ckpt, family, specs, plan, seed)
        self.instances = ModelParts.of(specs).instances
        self.shrinking = plan.direction == "shrink"
        if self.rescale == "auto" and self.shrinking:
            return self.rescale_candidates(imp, ckpt, plan)
        return self.rescaled_maps(imp, plan, self.rescale)

    def rescale_candidates(self, imp: Importance, ckpt: Checkpoint, plan: GrowthPlan) -> GrowthMaps | Candidates:
        """The maps of every rescale mode, for the pipeline to try on the held-out calibration tokens. The importance
        scores are measured once; the candidates differ only in their weights, so the pipeline writes each over the
        last in one model, and trying them costs a forward pass each, not a model each."""
        if all(plan.target.axis(a) == plan.source.axis(a) for a in (HIDDEN, FFN, KV_HEADS, QGROUP)):
            self.rescale_chosen = "none"  # only blocks are removed: every candidate is the same model
            return self.rescaled_maps(imp, plan, self.rescale_chosen)
        if self.heldout is None:  # importance="weights" with calibration text: only the held-out tokens are needed
            self.calibration_blocks(ckpt, plan)
        assert self.heldout is not None
        return Candidates({mode: self.rescaled_maps(imp, plan, mode) for mode in RESCALE_CANDIDATES}, self.heldout)

    def chosen(self, name: str, losses: dict[str, float]) -> None:
        self.rescale_chosen, self.rescale_losses = name, dict(losses)
        assert self.heldout is not None
        listed = ", ".join(f"{m} {v:.4f}" for m, v in losses.items())
        print(f"growkit: subclone rescale auto: {name} (loss on {self.heldout.numel()} held-out calibration tokens: "
              f"{listed})", file=sys.stderr)

    def rescaled_maps(self, imp: Importance, plan: GrowthPlan, rescale: str) -> GrowthMaps:
        """The axis maps for one fixed rescale mode, with the norm gains it asks for."""
        src, tgt = plan.source, plan.target
        identity: set[int] = set()
        if tgt.layers < src.layers:
            layer_src = keep_top(imp.blocks, tgt.layers).tolist()
        else:
            layer_src, identity = depth_map(plan.depth_method, src.layers, tgt.layers)

        sites = fanin_sites(rescale) if plan.direction == "shrink" else None
        fanin = sites or frozenset()
        hidden = self._map(imp.hidden, tgt.hidden, imp.hidden_energy if "stream" in fanin else None)
        if tgt.hidden > src.hidden:  # ranked duplicates give uneven multiplicities: exact under RMSNorm as net2net
            hidden = stream_exact(HIDDEN, hidden)
        per_layer: dict[tuple[str, int], AxisMap] = {}
        for new_layer, s in enumerate(layer_src):
            ffn_energy = imp.ffn_energy[s] if "ffn" in fanin else None
            per_layer[("ffn", new_layer)] = self._map(imp.ffn[s], tgt.ffn, ffn_energy)
            for kind, scores in imp.expert_ffn.items():  # a MoE layer's experts: each keeps its own neurons
                energy = imp.expert_ffn_energy[kind][s] if "ffn" in fanin else None
                per_layer[(kind, new_layer)] = self._map(scores[s], tgt.ffn, energy)
            heads, energy = imp.heads[s], imp.head_energy[s]
            kv = self._map(heads.sum(1), tgt.kv_heads, None)
            kept_kv = kv.src if tgt.kv_heads <= src.kv_heads else torch.arange(src.kv_heads)
            qg = self._map(heads[kept_kv].sum(0), tgt.qgroup, None)
            if "attn" in fanin and (kv.new < kv.old or qg.new < qg.old):
                kept = energy[kv.src][:, qg.src].sum()
                kv.scale = torch.full((kv.new,), float((energy.sum() / kept.clamp(min=1e-30)).sqrt()))
            per_layer[(KV_HEADS, new_layer)] = kv
            per_layer[(QGROUP, new_layer)] = qg

        gains: dict[str, float] = {}  # the gain only: a LayerNorm's bias is unchanged
        if sites is not None and tgt.hidden < src.hidden:
            for site, share in imp.norm_share.items():
                # norm statistic over the kept coordinates / over all = sqrt(kept share * old / new)
                gains[site] = math.sqrt(float(share[hidden.src].sum()) * src.hidden / tgt.hidden)
        return GrowthMaps(hidden=hidden, per_layer=per_layer, layer_src=layer_src, identity_layers=identity,
                          gains=gains, instances=self.instances)

    @staticmethod
    def _map(score: torch.Tensor, new: int, energy: torch.Tensor | None) -> AxisMap:
        old = score.numel()
        if new == old:
            return AxisMap.identity(old)
        if new > old:
            return AxisMap(old, ranked_fill(score, new))
        src = keep_top(score, new)
        scale = None
        if energy is not None:
            scale = torch.full((new,), float((energy.sum() / energy[src].sum().clamp(min=1e-30)).sqrt()))
        return AxisMap(old, src, scale=scale)
