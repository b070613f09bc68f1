"""`growkit.inspect`: one pass over a checkpoint for per-tensor statistics, the RC test and per-axis measures, and
distances to a second checkpoint; returned as a pydantic report, optionally written as JSON and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field, PrivateAttr

from growkit import interrupts
from growkit.arch.registry import family_for
from growkit.arch.spec import FFN, GROWABLE, PER_LAYER, Sizes, TensorSpec
from growkit.checkpoint.outputs import check_path
from growkit.checkpoint.reader import Checkpoint, load_checkpoint
from growkit.errors import GrowkitError
from growkit.measure.activations import DEFAULT_TOKENS, ResidualStream, RouterLoad, residual_stream
from growkit.measure.estimators import DEFAULT_RANK, NeuronPCA, held_out_log_likelihood
from growkit.measure.features import AxisKey, blocks_of, iter_tensors, key_label
from growkit.measure.fit import AxisFit
from growkit.measure.rc import Distance, RCTest, distance, rc_covariance_test
from growkit.operators.importance import ffn_instances
from growkit.measure.stats import TailStats, TensorStats, matrix_view, tail_stats, tensor_stats
from growkit.pipeline import all_finite, check_seed, single_threaded
from growkit.train.blocks import check_calibration_files


class TensorReport(TensorStats):
    """Statistics of one tensor and, for matrices, its RC covariance test."""

    rc: RCTest | None = None


class AxisReport(BaseModel):
    """One axis instance's neuron measure: size, spectrum of the (block-weighted) neuron Gram, held-out
    log-likelihood per neuron of each estimator in a rank-r PCA projection, and how heavy-tailed the neurons' norms
    (of their features across every tensor of the axis) are."""

    axis: str
    kind: str
    layer: int | None
    neurons: int
    feature_dim: int
    tensors: int
    rank: int
    explained: float
    effective_rank: float
    spectrum: list[float]
    loglik: dict[str, float | None]
    loglik_rank: int
    norm_tails: TailStats


class DistanceReport(BaseModel):
    """Distance between one tensor's row norms, column norms or entries in two checkpoints."""

    name: str
    template: str
    layer: int | None
    side: str
    distance: Distance


class InspectReport(BaseModel):
    checkpoint: str
    model_type: str
    family: str
    sizes: dict[str, int]
    units: str
    permutations: int
    max_dim: int
    seed: int
    tensors: list[TensorReport]
    axes: list[AxisReport]
    origin: dict[str, Any] = Field(default_factory=dict)  # e.g. dequantized from GGUF
    residual: ResidualStream | None = None
    routing: RouterLoad | None = None  # MoE models: each expert's share of the routed tokens, per layer
    compare: str | None = None
    distances: list[DistanceReport] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    _samples: dict[str, dict[str, dict[str, np.ndarray]]] = PrivateAttr(default_factory=dict)
    _neuron_norms: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)  # per axis label, for the plots

    def tensor(self, name: str) -> TensorReport:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def neuron_norms(self) -> dict[str, np.ndarray]:
        """Each axis instance's neuron norms, by axis label (not in the JSON)."""
        return self._neuron_norms

    def samples(self, which: str = "source") -> dict[str, dict[str, np.ndarray]]:
        """Row/column norms (or entries) per tensor, for `source` or `compare` (not in the JSON)."""
        return self._samples.get(which, {})

    def rc_table(self) -> list[dict[str, Any]]:
        """Rows for a per-tensor RC summary (matrices only)."""
        out = []
        for t in self.tensors:
            if t.rc is not None:
                out.append({"name": t.name, "template": t.template, "layer": t.layer, **t.rc.model_dump(),
                            "passes": t.rc.passes()})
        return out


def _open(path: str | Path | Checkpoint, config: Any = None, allow_pickle: bool = False) -> Checkpoint:
    return path if isinstance(path, Checkpoint) else load_checkpoint(path, config=config, allow_pickle=allow_pickle)


def _axis_keys(sizes: Sizes, ffn_kinds: list[str]) -> list[AxisKey]:
    keys: list[AxisKey] = []
    for kind in GROWABLE:
        if sizes.axis(kind) < 2:
            continue
        kinds = ffn_kinds if kind == FFN and ffn_kinds else [kind]
        if kind not in PER_LAYER:
            keys.append((kind, None))
        else:
            keys += [(k, layer) for layer in range(sizes.layers) for k in kinds]
    return keys


def finite_tensors(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes
                   ) -> Iterator[tuple[TensorSpec, int | None, torch.Tensor]]:
    """`iter_tensors`, refusing a tensor with NaN or Inf: every statistic of it would be NaN, shown as a figure."""
    for spec, layer, x in iter_tensors(ckpt, specs, sizes):
        if not all_finite(x):
            raise GrowkitError(f"{ckpt.source}: tensor {spec.at(layer)} contains NaN or Inf; inspect measures finite "
                               "weights only")
        yield spec, layer, x


def _scan(ckpt: Checkpoint, units: str) -> tuple[list, dict[str, dict[str, np.ndarray]]]:
    """(stats per tensor, samples) of a checkpoint, reading one tensor at a time."""
    family = family_for(ckpt.config, ckpt.source)
    sizes = family.sizes(ckpt.config)
    specs = family.tensors(ckpt.config, ckpt.names())
    stats, samples = [], {}
    tied = family.tied(ckpt.config)
    for spec, layer, x in finite_tensors(ckpt, specs, sizes):
        st, sm = tensor_stats(x, spec, layer, sizes, units, tied)
        stats.append(st)
        samples[st.name] = sm
    return stats, samples


def _axis_report(fit: AxisFit, rank: int, seed: int) -> tuple[AxisReport, np.ndarray]:
    """The axis's report, and its neurons' norms (of their features across every tensor of the axis)."""
    norms = fit.gram.diagonal().clamp(min=0).sqrt().numpy()
    pca = NeuronPCA.from_gram(fit.gram, fit.dim, rank)
    loglik, ll_rank = held_out_log_likelihood(fit.gram, fit.dim, rank=rank, seed=seed)
    total = float(pca.spectrum.clamp(min=0).sum())
    return AxisReport(axis=key_label(fit.key), kind=fit.key[0], layer=fit.key[1], neurons=fit.n, feature_dim=fit.dim,
                      tensors=len(fit.blocks), rank=pca.rank, explained=pca.explained,
                      effective_rank=pca.effective_rank(),
                      spectrum=[float(v) / total for v in pca.spectrum[:16]] if total > 0 else [],
                      loglik=loglik, loglik_rank=ll_rank, norm_tails=tail_stats(norms)), norms


def inspect(checkpoint: str | Path | Checkpoint, compare: str | Path | Checkpoint | None = None,
            out: str | Path | None = None, *, units: str = "mf", permutations: int = 199, max_dim: int = 256,
            rank: int = DEFAULT_RANK, seed: int = 0, plots: bool = True, config: Any = None,
            allow_pickle: bool = False, activations: bool = True, calibration: Sequence[str | Path] | None = None,
            calibration_tokens: int = DEFAULT_TOKENS) -> InspectReport:
    """Inspect a checkpoint: per-tensor row/column statistics and RC covariance tests, per-axis neuron measures
    (spectrum, held-out log-likelihood of each estimator, heavy tails of the neuron norms), the residual stream's
    per-dimension RMS on `calibration` text (random tokens without it; skipped with `activations=False`) with its
    outlier dimensions (and, for a MoE model, each layer's router load on those tokens), and, with `compare`,
    Wasserstein-1 / KS distances of row-norm, column-norm and entry distributions. A MoE layer's experts are
    measured one by one (`ffn_instances`). With `out`, writes `report.json` and PNG plots there."""
    if units not in ("mf", "sp", "raw"):
        raise GrowkitError(f"--units: expected mf, sp or raw, got {units!r}")
    if permutations < 1:
        raise GrowkitError(f"--permutations must be at least 1 (p-values need randomizations), got {permutations}")
    check_seed(seed)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise GrowkitError(f"{out}: exists and is not a directory (--out takes a directory for report.json and "
                           "plots)")
    if out is not None:
        inputs = [p for p in (checkpoint, compare, config, *(calibration or [])) if isinstance(p, (str, Path))]
        check_path(Path(out), inputs, "--out")
    check_calibration_files(calibration or [])
    if calibration and not activations:
        raise GrowkitError("--calibration is text for the activation measures, which --no-activations turns off")
    ckpt = _open(checkpoint, config, allow_pickle)
    family = family_for(ckpt.config, ckpt.source)
    sizes = family.sizes(ckpt.config)
    specs = family.tensors(ckpt.config, ckpt.names())
    instances = ffn_instances(specs)
    keys = _axis_keys(sizes, list(dict.fromkeys(instances.values())))
    wanted = set(keys)
    fits: dict[AxisKey, AxisFit] = {}  # created on first use, dropped once complete: one layer's Grams at a time
    tensors: list[TensorReport] = []
    samples: dict[str, dict[str, np.ndarray]] = {}
    axes: dict[AxisKey, AxisReport] = {}
    norms: dict[str, np.ndarray] = {}

    def report_axis(key: AxisKey) -> None:
        with single_threaded():  # LAPACK eigh of ~1000 neurons: threads cost far more than they save
            axes[key], norms[key_label(key)] = _axis_report(fits.pop(key), rank, seed)
    tied = family.tied(ckpt.config)
    interrupts.pause_point("measuring")
    for spec, layer, x in finite_tensors(ckpt, specs, sizes):
        if layer is not None:  # a layer's Gram matrices are complete once the next layer starts: report, drop
            for key in [k for k in fits if k[1] is not None and k[1] < layer]:
                report_axis(key)
        st, sm = tensor_stats(x, spec, layer, sizes, units, tied)
        view = matrix_view(x * st.unit, spec)
        with single_threaded():  # many small ops on a 256 x 256 window: intra-op threads only add overhead
            rc = rc_covariance_test(view[0], permutations, max_dim, seed) if view is not None else None
        tensors.append(TensorReport(**st.model_dump(), rc=rc))
        samples[st.name] = sm
        for block in blocks_of(x, spec, layer, sizes):
            if block.key[0] == FFN and instances:
                if spec.name not in instances:
                    continue  # a product ffn dim: per-tensor statistics only
                block.key = (instances[spec.name], layer)
            if block.key not in wanted or block.key in axes:  # an axis of size 1, or one already reported
                continue
            if block.key not in fits:
                n = sizes.axis(block.key[0].split("[")[0])
                fits[block.key] = AxisFit(block.key, n, torch.zeros(n, n, dtype=torch.float64))
            fits[block.key].add(block)
    for key in list(fits):
        report_axis(key)

    report = InspectReport(checkpoint=str(ckpt.source), model_type=ckpt.model_type, family=family.name,
                           sizes=sizes.as_dict(), units=units, permutations=permutations, max_dim=max_dim, seed=seed,
                           tensors=tensors, axes=[axes[k] for k in keys], origin=ckpt.origin())
    if activations:
        report.residual, report.routing = residual_stream(ckpt, specs, sizes, calibration, calibration_tokens, seed)
    report._samples["source"] = samples
    report._neuron_norms = norms
    if compare is not None:
        other = _open(compare, None, allow_pickle)
        if family_for(other.config, other.source).name != family.name:
            raise GrowkitError(f"{other.source}: cannot compare a {other.model_type} model with a {ckpt.model_type} one")
        other_stats, other_samples = _scan(other, units)
        report.compare = str(other.source)
        report._samples["compare"] = other_samples
        for st in other_stats:
            mine = samples.get(st.name)
            if mine is None:
                continue
            for side in ("rows", "cols", "entries"):
                if side in mine and side in other_samples[st.name]:
                    report.distances.append(DistanceReport(name=st.name, template=st.template, layer=st.layer,
                                                           side=side,
                                                           distance=distance(mine[side], other_samples[st.name][side])))
    if out is not None:
        write_report(report, Path(out), plots=plots)
    return report


def write_report(report: InspectReport, out: Path, plots: bool = True) -> list[Path]:
    """Write report.json (and the plots) into `out`; the paths are recorded in `report.files`."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if plots:
        from growkit.measure.plots import write_plots

        files += write_plots(report, out)
    path = out / "report.json"
    report.files = [str(p) for p in [path, *files]]
    path.write_text(json.dumps(json.loads(report.model_dump_json()), indent=2) + "\n")
    return [path, *files]
