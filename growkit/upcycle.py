"""`growkit.upcycle`: a dense Llama-family checkpoint -> a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint, or a MoE
checkpoint -> the same family with more experts (copies of its own), streamed.

The source is read and checked as `grow` reads it (an identity growth plan: every tensor, shape and config field);
attention, norms and embeddings are copied, each FFN tensor becomes its experts' slices (`growkit.apply`), and
the output goes through the same output checks, streamed writer and atomic rename as `grow`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from growkit import __version__
from growkit.apply import expert_tensor, router_tensor, selected_router, shared_gate_tensor, shared_tensor
from growkit.arch.moe import (
    DENSE_PROJECTIONS, EXPERTS, LAYOUTS, MoeFamily, dense_projection, grouped_mm_note, moe_config,
)
from growkit.arch.registry import family_for
from growkit.arch.spec import parameter_count
from growkit.arch.validate import config_problem
from growkit.checkpoint.reader import Checkpoint, load_checkpoint
from growkit.checkpoint.writer import CheckpointWriter, TensorEntry
from growkit.errors import GrowkitError
from growkit.operators.experts import ExpertRanking, plan_selection, read_layer_experts
from growkit.operators.upcycle import UpcyclePlan, UpcycleRequest, exact_top_k, plan_duplication, plan_upcycle
from growkit.pipeline import (
    Growth, all_finite, check_seed, checked_arguments, clean_temporaries, config_errors, plan_growth,
    write_weights_and_config,
)
from growkit.plan import Direction
from growkit.resources import check_disk, check_memory
from growkit.verify import verify_growth


@dataclass
class Upcycling:
    """Everything decided before the first weight is read."""

    growth: Growth  # the dense source read and checked as an identity growth
    plan: UpcyclePlan
    config: dict[str, Any]
    router_std: float
    seed: int

    def entries(self, dtype: torch.dtype) -> list[tuple[TensorEntry, str, Any]]:
        """Output tensors in write order, each with what makes it: ("copy", spec), ("expert", (spec, e)),
        ("shared", spec), ("router", None) or ("shared_gate", None)."""
        plan, source = self.plan, self.plan.source
        layout, hidden = plan.layout, source.hidden
        out: list[tuple[TensorEntry, str, Any]] = []

        def shape(spec: Any, ffn: int) -> tuple[int, ...]:
            return source.replace(ffn=ffn).shape(spec)

        for layer in [None, *range(source.layers)]:
            ffn_specs = []
            for spec in self.growth.specs:
                if spec.per_layer != (layer is not None):
                    continue
                if dense_projection(spec.name) is not None:
                    ffn_specs.append(spec)
                    continue
                out.append((TensorEntry(spec.at(layer), shape(spec, source.ffn), dtype), "copy", (spec, layer)))
            if layer is None:
                continue
            out.append((TensorEntry(layout.router().format(layer), (plan.request.experts, hidden), dtype), "router",
                        layer))
            for e in range(plan.request.experts):
                for spec in ffn_specs:
                    name = layout.expert(e, dense_projection(spec.name) or "").format(layer)
                    out.append((TensorEntry(name, shape(spec, plan.expert_ffn), dtype), "expert", (spec, layer, e)))
            if layout.shared:
                for spec in ffn_specs:
                    name = layout.shared_expert(dense_projection(spec.name) or "").format(layer)
                    out.append((TensorEntry(name, shape(spec, plan.shared_ffn), dtype), "shared", (spec, layer)))
                out.append((TensorEntry(layout.shared_gate().format(layer), (1, hidden), dtype), "shared_gate", layer))
        return out

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
        """Each output tensor in write order, computed in fp32 from its one dense source tensor."""
        ckpt, sizes = self.growth.ckpt, self.growth.plan.source
        checked: set[str] = set()
        for entry, kind, what in self.entries(dtype):
            if kind in ("router", "shared_gate"):
                y = router_tensor(self.plan, what, self.router_std, self.seed) if kind == "router" else (
                    shared_gate_tensor(self.plan))
                yield entry, y.to(dtype)
                continue
            spec, layer = what[0], what[1]
            name = spec.at(layer)
            x = ckpt.get(name).to(torch.float32)
            if name not in checked:
                if not all_finite(x):
                    raise GrowkitError(f"{ckpt.source}: tensor {name} contains NaN or Inf")
                checked.add(name)
            if kind == "copy":
                y = x
            elif kind == "router_rows":
                y = selected_router(x, self.plan, layer)
            elif kind == "expert":
                y = expert_tensor(x, spec, layer, self.plan, what[2], sizes, self.seed)
            else:
                y = shared_tensor(x, spec, layer, self.plan, sizes, self.seed)
            out = y.to(dtype)
            if not all_finite(out):
                raise GrowkitError(f"{ckpt.source}: output tensor {entry.name} would not be finite in "
                                   f"{str(dtype).removeprefix('torch.')}; nothing was written")
            yield entry, out

    def parameters(self) -> dict[str, int]:
        """Total and active (per token: K routed experts, the shared expert, the router) parameter counts."""
        entries = self.entries(torch.float32)
        total = sum(math.prod(e.shape) for e, _, _ in entries)
        idle = self.plan.request.experts - self.plan.request.top_k
        per_expert = len(DENSE_PROJECTIONS) * self.plan.source.hidden * self.plan.expert_ffn
        return {"total": total, "active": total - idle * per_expert * self.plan.source.layers,
                "source": parameter_count(self.growth.specs, self.growth.plan.source)}


@dataclass
class ExpertSelection(Upcycling):
    """A MoE source with more or fewer experts: each new expert and its router row a copy of a source one, per layer
    (`plan.layer_sources`: copies from `plan_duplication`, a subset from `plan_selection`)."""

    #: fewer experts: how the kept ones were chosen ("copies", "activations", "weights" or "strided")
    ranked: str | None = None

    def entries(self, dtype: torch.dtype) -> list[tuple[TensorEntry, str, Any]]:
        plan, sizes = self.plan, self.growth.plan.source
        layout = plan.layout
        expert_specs = {layout.expert(e, p): (e, p) for e in range(plan.routed_slices) for p in DENSE_PROJECTIONS}
        out: list[tuple[TensorEntry, str, Any]] = []
        for layer in [None, *range(sizes.layers)]:
            experts: dict[tuple[int, str], Any] = {}
            for spec in self.growth.specs:
                if spec.per_layer != (layer is not None):
                    continue
                shape = sizes.shape(spec)
                if spec.name in expert_specs:
                    experts[expert_specs[spec.name]] = spec
                elif spec.name == layout.router():
                    out.append((TensorEntry(spec.at(layer), (plan.request.experts, shape[1]), dtype), "router_rows",
                                (spec, layer)))
                else:
                    out.append((TensorEntry(spec.at(layer), shape, dtype), "copy", (spec, layer)))
            for e in range(plan.request.experts if layer is not None else 0):
                for projection in DENSE_PROJECTIONS:
                    spec = experts[(plan.layer_sources[layer][e], projection)]
                    shape = sizes.shape(spec)
                    out.append((TensorEntry(layout.expert(e, projection).format(layer), shape, dtype), "expert",
                                (spec, layer, e)))
        return out


def plan_upcycling(ckpt: Checkpoint, request: UpcycleRequest, seed: int = 0) -> Upcycling:
    """Check the source and the request and decide everything; reads headers only."""
    check_seed(seed)
    growth = plan_growth(ckpt)  # every check `grow` makes of a source, with nothing to grow
    config = ckpt.config
    try:
        plan = plan_upcycle(ckpt.model_type, growth.plan.source, request)
    except GrowkitError as exc:
        raise GrowkitError(f"{ckpt.source}: {exc}") from None
    if config.get("mlp_bias"):
        raise GrowkitError(f"{ckpt.source}: the FFN has biases (mlp_bias), which {plan.layout.model_type} experts "
                           "do not have")
    if plan.layout.model_type == "mixtral" and config.get("attention_bias"):
        raise GrowkitError(f"{ckpt.source}: attention has biases (attention_bias), which mixtral does not have")
    new_config = moe_config(config, plan.layout, experts=request.experts, top_k=request.top_k,
                            expert_ffn=plan.expert_ffn, shared_ffn=plan.shared_ffn,
                            normalise_topk=request.normalise_topk)
    problem = config_problem(family_for(new_config), new_config)
    if problem is not None:
        raise GrowkitError(f"{ckpt.source}: the {plan.layout.model_type} config would not load: {problem}")
    std = request.router_std if request.router_std is not None else float(config.get("initializer_range") or 0.02)
    return Upcycling(growth=growth, plan=plan, config=new_config, router_std=std, seed=seed)


def plan_expert_count(ckpt: Checkpoint, request: UpcycleRequest, seed: int = 0,
                      ranking: ExpertRanking | None = None) -> ExpertSelection:
    """More experts for a MoE checkpoint (copies, decided before any weight is read), or fewer (`ranking`: how
    experts are ranked where keeping copies is not exact; reads the routers and experts, and with calibration text
    runs the source model)."""
    check_seed(seed)
    growth = plan_growth(ckpt)
    config = ckpt.config
    layout = LAYOUTS[ckpt.model_type]
    source = growth.plan.source
    experts, top_k = source.axis(EXPERTS), int(config["num_experts_per_tok"])
    ranked = None
    try:
        if ranking is None:
            plan = plan_duplication(layout, source, experts, top_k, request)
        else:
            layers = [read_layer_experts(ckpt, layout, layer, experts) for layer in range(source.layers)]
            normalised = layout.topk_norm_key is None or bool(config.get(layout.topk_norm_key))
            rank = None if ranking.method == "select" else lambda: ranking.scores(ckpt, layout, source, layers)
            plan, by_copies = plan_selection(layout, source, experts, top_k, normalised, request, layers, rank)
            ranked = "copies" if by_copies else ranking.used
    except GrowkitError as exc:
        raise GrowkitError(f"{ckpt.source}: {exc}") from None
    new_config = dict(config, num_experts_per_tok=plan.request.top_k)
    for key in {layout.experts_key, "num_local_experts"} & (set(config) | {layout.experts_key}):
        new_config[key] = plan.request.experts
    problem = config_problem(family_for(new_config), new_config)
    if problem is not None:
        raise GrowkitError(f"{ckpt.source}: the {layout.model_type} config would not load: {problem}")
    return ExpertSelection(growth=growth, plan=plan, config=new_config, router_std=0.0, seed=seed, ranked=ranked)


def _provenance(up: Upcycling, src: Path, command: str | None, dtype: torch.dtype) -> dict[str, Any]:
    plan, ckpt = up.plan, up.growth.ckpt
    request = asdict(plan.request)
    request["to"] = plan.layout.model_type
    return {
        "growkit_version": __version__,
        "kind": "upcycle",
        "source": {"path": str(src), "model_type": ckpt.model_type, "config": ckpt.config,
                   "config_inferred": ckpt.config_inferred, **ckpt.origin()},
        "target": {"model_type": plan.layout.model_type, "experts": plan.request.experts, "top_k": plan.request.top_k,
                   "expert_ffn": plan.expert_ffn, "shared_ffn": plan.shared_ffn, "copies": plan.copies,
                   "routed_slices": plan.routed_slices},
        "options": {**request, "router_std": up.router_std, "seed": up.seed,
                    "dtype": str(dtype).removeprefix("torch.")},
        "parameters": up.parameters(),
        "exact_at_step_0": plan.exact,
        "not_exact_because": plan.notes,
        "command": command or "python api",
        "verification": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class UpcycleResult:
    out_dir: Path
    provenance: dict[str, Any]


def upcycle(src: str | Path, out: str | Path | None = None, *, experts: int, top_k: int | None = None,
            to: str | None = None,
            granularity: int = 1, shared_experts: int = 0, router: str = "random", router_std: float | None = None,
            expert_noise: float | None = None, reinit_ratio: float = 0.0, norm_topk_prob: bool = True,
            seed: int = 0, dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB",
            overwrite: bool = False, quiet: bool = False, config: str | Path | Mapping[str, Any] | None = None,
            verify: bool = False, allow_pickle: bool = False, command: str | None = None) -> UpcycleResult:
    """Upcycle the dense checkpoint at `src` into a mixture-of-experts checkpoint directory `out` (streamed, atomic);
    a MoE checkpoint gets `experts` experts by copying its own (`top_k` default: the source's times the copies,
    which keeps it exact; 2 for a dense source).

    `expert_noise` is a signal-to-noise ratio in dB, as `grow`'s `noise_snr_db`; see `growkit.operators.upcycle`
    for when the result computes exactly what the source model did.
    """
    src = Path(src)
    out, shard_bytes, asked_dtype = checked_arguments(src, out, "upcycle", config, None, overwrite, seed, dtype,
                                                      max_shard_size)
    ckpt = load_checkpoint(src, config=config, allow_pickle=allow_pickle, quiet=quiet)
    moe_source = is_moe(ckpt)
    if top_k is None and moe_source:
        with config_errors(ckpt.source):
            top_k = exact_top_k(int(ckpt.config["num_experts_per_tok"]), MoeFamily.experts(ckpt.config), experts)
    request = UpcycleRequest(experts=experts, top_k=top_k or 2, to=to, granularity=granularity,
                             shared_experts=shared_experts, router=router, router_std=router_std,
                             expert_noise_db=expert_noise, reinit_ratio=reinit_ratio, normalise_topk=norm_topk_prob)
    up = plan_expert_count(ckpt, request, seed) if moe_source else plan_upcycling(ckpt, request, seed)
    return _write(up, src, out, "upcycle", command, asked_dtype, shard_bytes, overwrite, verify)


def is_moe(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint is one of the MoE families growkit reads (Mixtral, Qwen2-MoE, Qwen3-MoE)."""
    return isinstance(ckpt.config.get("model_type"), str) and ckpt.config["model_type"] in LAYOUTS


def change_experts(src: str | Path, out: str | Path | None = None, *, experts: int, direction: Direction,
                   top_k: int | None = None, ranking: ExpertRanking | None = None, seed: int = 0,
                   dtype: str | torch.dtype | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
                   quiet: bool = False, config: str | Path | Mapping[str, Any] | None = None, verify: bool = False,
                   allow_pickle: bool = False, command: str | None = None) -> UpcycleResult:
    """`grow --experts N` and `shrink --experts N` of a MoE checkpoint (default output SRC-grown / SRC-shrunk).

    Growing copies each expert N / E times, as `upcycle` does for a MoE source (top-k default: the source's times
    the copies, exact). Shrinking keeps N experts per layer (`growkit.operators.experts`): exactly where the experts
    are copies or interchangeable, else the most important by `ranking` (default: subclone's, activations on its
    calibration text or weight norms), announced as not exact and recorded in growkit.json with how they were chosen.
    """
    src = Path(src)
    out, shard_bytes, asked_dtype = checked_arguments(src, out, direction, config, None, overwrite, seed, dtype,
                                                      max_shard_size)
    ckpt = load_checkpoint(src, config=config, allow_pickle=allow_pickle, quiet=quiet)
    if not is_moe(ckpt):
        raise GrowkitError(f"{ckpt.source}: --experts: a {ckpt.model_type} model has no routed experts (growkit "
                           "upcycle makes a mixture of experts from a dense model)")
    with config_errors(ckpt.source):
        source_experts, source_top_k = MoeFamily.experts(ckpt.config), int(ckpt.config["num_experts_per_tok"])
    if (experts < source_experts) != (direction == "shrink") or experts == source_experts:
        what = "more" if direction == "grow" else "fewer"
        raise GrowkitError(f"{ckpt.source}: {direction} --experts {experts}: the model has {source_experts} experts; "
                           f"give {what}")
    if direction == "grow":
        top_k = top_k if top_k is not None else exact_top_k(source_top_k, source_experts, experts)
        request = UpcycleRequest(experts=experts, top_k=top_k)
        up = plan_expert_count(ckpt, request, seed)
    else:
        request = UpcycleRequest(experts=experts, top_k=top_k or 0)
        up = plan_expert_count(ckpt, request, seed, ranking or ExpertRanking("subclone"))
    return _write(up, src, out, direction, command, asked_dtype, shard_bytes, overwrite, verify)


def _write(up: Upcycling, src: Path, out: Path, kind: str, command: str | None, asked_dtype: torch.dtype | None,
           shard_bytes: int, overwrite: bool, verify: bool) -> UpcycleResult:
    """Announce what is not exact, then stream the planned tensors, config and growkit.json into `out` (atomic)."""
    ckpt, seed = up.growth.ckpt, up.seed
    out_dtype = asked_dtype or ckpt.storage_dtype()
    for note in up.plan.notes:
        print(f"growkit: note: not exact at step 0: {note}", file=sys.stderr)
    provenance = _provenance(up, src, command, out_dtype)
    provenance["kind"] = kind
    if isinstance(up, ExpertSelection) and up.ranked is not None:
        provenance["experts_kept"] = {"ranked_by": up.ranked, "per_layer": up.plan.layer_sources}
    if (kernel := grouped_mm_note(up.plan.expert_ffn, out_dtype)) is not None:
        print(f"growkit: note: {kernel}", file=sys.stderr)
        provenance["notes"] = [kernel]
    new_config = dict(up.config)
    new_config["dtype"] = str(out_dtype).removeprefix("torch.")
    new_config.pop("torch_dtype", None)
    metadata = {"format": "pt", "config": json.dumps(new_config, sort_keys=True),
                "growkit": json.dumps({k: provenance[k] for k in ("growkit_version", "kind", "target", "options")})}
    clean_temporaries(out)
    entries = [e for e, _, _ in up.entries(out_dtype)]
    with CheckpointWriter(out, entries, shard_bytes, metadata, overwrite=overwrite) as writer:
        _check_fits(up, out, entries, verify)
        write_weights_and_config(writer, up.tensors(out_dtype), new_config, ckpt)
        if verify:
            provenance["verification"] = verify_growth(ckpt, writer.tmp, seed=seed)
        writer.add_file("growkit.json", json.dumps(provenance, indent=2) + "\n")
        out_dir = writer.commit()
    return UpcycleResult(out_dir=out_dir, provenance=provenance)


def _check_fits(up: Upcycling, out: Path, entries: list[TensorEntry], verify: bool) -> None:
    """Refuse, before the first tensor, an output the disk cannot hold or a tensor memory cannot hold (the dense
    tensor and one output tensor in fp32); `verify` holds both whole models."""
    params = up.parameters()
    check_disk(out, sum(e.nbytes for e in entries), f"the output ({params['total']:,} parameters)")
    largest = max(math.prod(e.shape) for e in entries)
    check_memory(up.growth.ckpt.source, 2 * largest * 4, "upcycling one tensor")
    if verify:
        check_memory(up.growth.ckpt.source, (params["total"] + params["source"]) * 4,
                     "--verify (dense and MoE models in fp32)")
