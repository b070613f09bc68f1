"""`growkit inspect`: the command-line face of `growkit.inspect` (terminal tables, JSON report, PNG plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from growkit.measure.activations import DEFAULT_TOKENS, ResidualStream, RouterLoad
from growkit.measure.plots import short_name
from growkit.measure.report import InspectReport, inspect

Opt = typer.Option


def _g(v: float | None, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def tensor_table(report: InspectReport) -> Table:
    table = Table(title=f"tensors of {report.checkpoint} ({report.model_type}; {report.units} units; norms are RMS)")
    for col in ("tensor", "shape", "fan-in", "entry std", "kurtosis", "row norm", "col norm", "row kurt", "col kurt"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for t in report.tensors:
        table.add_row(short_name(t.template, t.layer), "x".join(map(str, t.shape)), str(t.fan_in),
                      _g(t.entries.std), _g(t.entries.kurtosis, ".2f"),
                      f"{t.rows.norm_mean:.3g}±{t.rows.norm_std:.2g}" if t.rows else "-",
                      f"{t.cols.norm_mean:.3g}±{t.cols.norm_std:.2g}" if t.cols else "-",
                      _g(t.rows.kurtosis_mean, ".2f") if t.rows else "-",
                      _g(t.cols.kurtosis_mean, ".2f") if t.cols else "-")
    return table


def rc_table(report: InspectReport) -> Table:
    table = Table(title=f"RC covariance test: correlation of squared entries (p from {report.permutations} "
                        "randomizations; z against the null)")
    for col in ("tensor", "window", "same row", "p", "z", "same col", "p", "z", "disjoint", "p", "z", "RC"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for t in report.tensors:
        rc = t.rc
        if rc is None:
            continue
        table.add_row(short_name(t.template, t.layer), f"{rc.rows}x{rc.cols}",
                      f"{rc.corr_row:+.3f}", _p(rc.p_row), f"{rc.z_row:.1f}",
                      f"{rc.corr_col:+.3f}", _p(rc.p_col), f"{rc.z_col:.1f}",
                      f"{rc.corr_disjoint:+.3f}", _p(rc.p_disjoint), f"{rc.z_disjoint:.1f}",
                      "pass" if rc.passes() else "fail")
    return table


def axis_table(report: InspectReport) -> Table:
    table = Table(title="axes (neuron features in mean-field units, one block per tensor; log-likelihood per "
                        "held-out neuron in the rank-r PCA projection; tails of the neuron norms: excess kurtosis, "
                        "largest / median, Hill tail index of the top tenth (smaller = heavier), largest neuron)")
    for col in ("axis", "neurons", "feature dim", "tensors", "top-r share", "eff. rank", "r", "LL kde",
                "LL gaussian", "norm kurt", "max/med", "Hill α", "top"):
        table.add_column(col, justify="left" if col == "axis" else "right")
    for a in report.axes:
        t = a.norm_tails
        table.add_row(a.axis, str(a.neurons), str(a.feature_dim), str(a.tensors), f"{a.explained:.2f}",
                      f"{a.effective_rank:.1f}", str(a.loglik_rank), _g(a.loglik.get("kde"), ".2f"),
                      _g(a.loglik.get("gaussian"), ".2f"), _g(t.kurtosis, ".2f"), _g(t.max_over_median, ".3g"),
                      _g(t.hill_alpha, ".2f"), str(t.top))
    return table


def residual_table(stream: ResidualStream) -> Table:
    table = Table(title=f"residual stream: per-dimension RMS on {stream.tokens}, {stream.token_count} tokens "
                        f"(outlier: RMS > {stream.outlier_ratio:g}x the median dimension's)")
    for col in ("after", "median RMS", "max RMS", "max dim", "max |h|", "outliers"):
        table.add_column(col, justify="left" if col == "after" else "right")
    for i, label in enumerate(stream.points):
        count = sum(1 for o in stream.outliers if i in o.points)
        table.add_row(label, f"{stream.median_rms[i]:.3g}", f"{stream.max_rms[i]:.3g}", str(stream.argmax_dim[i]),
                      f"{stream.max_abs[i]:.3g}", str(count) if count else "-")
    return table


def outlier_table(stream: ResidualStream) -> Table:
    table = Table(title=f"outlier dimensions of the residual stream ({len(stream.outliers)})")
    for col in ("dim", "where", "peak RMS", "at", "median there", "ratio", "max |h|"):
        table.add_column(col, justify="left" if col == "where" else "right")
    for o in stream.outliers:
        table.add_row(str(o.dim), o.where, f"{o.peak_rms:.4g}", stream.points[o.peak_point], f"{o.median_at_peak:.3g}",
                      f"{o.peak_rms / o.median_at_peak:.3g}x" if o.median_at_peak > 0 else "-", f"{o.max_abs:.4g}")
    return table


def routing_table(routing: RouterLoad, tokens: str) -> Table:
    experts = len(routing.fractions[0])
    table = Table(title=f"router load on {tokens}: each expert's share of the top-{routing.top_k} assignments "
                        f"(balanced: {1 / experts:.3g})")
    for col in ("layer", *(f"e{e}" for e in range(experts)), "max / mean"):
        table.add_column(col, justify="right")
    for layer, (row, peak) in enumerate(zip(routing.fractions, routing.max_over_mean)):
        table.add_row(str(layer), *(f"{f:.3f}" for f in row), f"{peak:.3g}")
    return table


def distance_table(report: InspectReport) -> Table:
    table = Table(title=f"distances to {report.compare} ({report.units} units): W1 (relative to the mean) and KS")
    for col in ("tensor", "side", "W1", "W1 rel", "KS", "KS p"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for d in report.distances:
        x = d.distance
        table.add_row(short_name(d.template, d.layer), d.side, f"{x.w1:.3g}", f"{x.w1_rel:.3f}", f"{x.ks:.3f}",
                      _p(x.ks_p))
    return table


def inspect_command(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory, .safetensors or .gguf file")],
    compare: Annotated[Optional[Path], Opt("--compare", help="Second checkpoint: norm distances and QQ plots")] = None,
    out: Annotated[Optional[Path], Opt("--out", "-o", help="Directory for report.json and PNG plots")] = None,
    units: Annotated[str, Opt(help="mf (x fan-in, mean-field), sp (x sqrt(fan-in)) or raw")] = "mf",
    permutations: Annotated[int, Opt(help="Permutations for the RC test's p-values")] = 199,
    max_dim: Annotated[int, Opt("--max-dim", help="RC test on a window of at most this many rows/columns")] = 256,
    rank: Annotated[int, Opt(help="PCA rank of the kde/gaussian measures")] = 8,
    seed: Annotated[int, Opt(help="Seed for windows, permutations and held-out splits")] = 0,
    plots: Annotated[bool, Opt("--plots/--no-plots", help="Write PNG plots with --out")] = True,
    config: Annotated[Optional[Path], Opt(help="config.json for a bare .safetensors file")] = None,
    allow_pickle: Annotated[bool, Opt("--allow-pickle", help="Load pytorch_model.bin (weights_only)")] = False,
    activations: Annotated[bool, Opt("--activations/--no-activations", help="Run the model to measure the residual "
                                     "stream's per-dimension RMS")] = True,
    calibration: Annotated[Optional[list[Path]], Opt(help="Text file(s) for the residual-stream measure (repeat the "
                                                     "option for several); without it, random tokens")] = None,
    calibration_tokens: Annotated[int, Opt("--calibration-tokens", help="Tokens to run")] = DEFAULT_TOKENS,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No tables, only the written paths")] = False,
) -> None:
    """Inspect a checkpoint: row/column statistics, the RC covariance test, per-axis neuron measures and the residual
    stream's outlier dimensions."""
    report = inspect(ckpt, compare, out, units=units, permutations=permutations, max_dim=max_dim, rank=rank,
                     seed=seed, plots=plots, config=config, allow_pickle=allow_pickle, activations=activations,
                     calibration=calibration, calibration_tokens=calibration_tokens)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped output: keep whole rows rather than wrapping to 80 columns
    if not quiet:
        console.print(tensor_table(report))
        console.print(rc_table(report))
        console.print(axis_table(report))
        if report.residual is not None:
            console.print(residual_table(report.residual))
            console.print(outlier_table(report.residual))
        if report.routing is not None and report.residual is not None:
            console.print(routing_table(report.routing, report.residual.tokens))
        if report.compare is not None:
            console.print(distance_table(report))
    for path in report.files:
        console.print(f"wrote {path}")
