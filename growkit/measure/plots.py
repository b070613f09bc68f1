"""PNG plots of an inspect report: row/column-norm histograms, QQ plots against a second checkpoint, and RC
covariance bars per layer. Uses matplotlib's object API with the Agg canvas, so no global backend is touched."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from growkit.measure.activations import ResidualStream
    from growkit.measure.report import InspectReport, TensorReport

MAX_PANELS = 24
_ROW, _COL, _DIS = "#1f77b4", "#ff7f0e", "#2ca02c"


def short_name(template: str, layer: int | None = None) -> str:
    """`model.layers.{}.self_attn.q_proj.weight` -> `self_attn.q_proj@3`; globals keep their last parts."""
    name = re.sub(r"^(transformer\.|model\.)", "", template)
    name = re.sub(r"^(h|layers)\.\{\}\.", "", name).removesuffix(".weight")
    return name if layer is None else f"{name}@{layer}"


def _figure(panels: int, ncols: int = 4, size: tuple[float, float] = (3.6, 2.8)) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, panels))
    nrows = (panels + ncols - 1) // ncols
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.6), dpi=110)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _matrices(report: "InspectReport") -> list["TensorReport"]:
    """The matrices to draw: every global one, and for per-layer ones the first, middle and last layer."""
    layers = report.sizes["layers"]
    keep = {0, layers // 2, layers - 1}
    chosen = [t for t in report.tensors if t.rows is not None and (t.layer is None or t.layer in keep)]
    return chosen[:MAX_PANELS]


def plot_norms(report: "InspectReport", path: Path) -> Path:
    """Histograms of row and column RMS norms per matrix (solid: this checkpoint, dashed: --compare)."""
    tensors = _matrices(report)
    fig, axes = _figure(len(tensors))
    src, cmp = report.samples("source"), report.samples("compare")
    for ax, t in zip(axes, tensors):
        for side, colour in (("rows", _ROW), ("cols", _COL)):
            values = src[t.name][side]
            other = cmp.get(t.name, {}).get(side)
            pool = values if other is None else np.concatenate([values, other])
            bins = np.linspace(pool.min(), pool.max() + 1e-12, 30)
            ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colour,
                    label=f"{side} ({t.rows_axis if side == 'rows' else t.cols_axis})")
            if other is not None:
                ax.hist(other, bins=bins, density=True, histtype="step", linestyle="--", linewidth=1.4,
                        color=colour, label=f"{side}, compare")
        ax.set_title(short_name(t.template, t.layer), fontsize=9)
        ax.set_xlabel(f"RMS norm ({report.units} units)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(f"row/column norms: {report.checkpoint}" + (f" vs {report.compare}" if report.compare else ""),
                 fontsize=10)
    return _save(fig, path)


def plot_qq(report: "InspectReport", path: Path) -> Path:
    """Quantiles of row and column norms: this checkpoint (x) against --compare (y); on the diagonal if equal."""
    cmp = report.samples("compare")
    tensors = [t for t in _matrices(report) if t.name in cmp]
    fig, axes = _figure(max(len(tensors), 1))
    src = report.samples("source")
    q = np.linspace(0.01, 0.99, 50)
    for ax, t in zip(axes, tensors):
        lo, hi = np.inf, -np.inf
        for side, colour in (("rows", _ROW), ("cols", _COL)):
            a, b = np.quantile(src[t.name][side], q), np.quantile(cmp[t.name][side], q)
            ax.plot(a, b, "o", markersize=3, color=colour, label=side)
            lo, hi = min(lo, a.min(), b.min()), max(hi, a.max(), b.max())
        ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8)
        ax.set_title(short_name(t.template, t.layer), fontsize=9)
        ax.set_xlabel("this checkpoint", fontsize=8)
        ax.set_ylabel("compare", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(f"QQ of RMS norms ({report.units} units): {report.checkpoint} vs {report.compare}", fontsize=10)
    return _save(fig, path)


def plot_rc(report: "InspectReport", path: Path, alpha: float = 0.01) -> Path:
    """RC covariance test per matrix kind: bars per layer for the row, column and disjoint correlations of
    squared entries; solid bars are significant at `alpha`, hatched ones are not."""
    templates: dict[str, list[TensorReport]] = {}
    for t in report.tensors:
        if t.rc is not None:
            templates.setdefault(t.template, []).append(t)
    fig, axes = _figure(max(len(templates), 1), ncols=3, size=(4.6, 3.0))
    width = 0.27
    for ax, (template, ts) in zip(axes, templates.items()):
        x = np.arange(len(ts))
        for k, (field, colour, label) in enumerate((("row", _ROW, "same row"), ("col", _COL, "same column"),
                                                    ("disjoint", _DIS, "disjoint (index neighbours)"))):
            values = [getattr(t.rc, f"corr_{field}") for t in ts]
            pvals = [getattr(t.rc, f"p_{field}") for t in ts]
            for xi, v, p in zip(x, values, pvals):
                sig = p < alpha
                ax.bar(xi + (k - 1) * width, v, width, color=colour if sig else "white", edgecolor=colour,
                       hatch=None if sig else "///", label=label if xi == 0 else None)
        ax.axhline(0, color="0.3", linewidth=0.6)
        ax.set_xticks(x, ["global" if t.layer is None else f"L{t.layer}" for t in ts], fontsize=7)
        ax.set_title(short_name(template), fontsize=9)
        ax.set_ylabel("corr. of squared entries", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(f"RC covariance test (solid: p < {alpha}, hatched: not significant): {report.checkpoint}",
                 fontsize=10)
    return _save(fig, path)


def plot_residual(report: "InspectReport", stream: "ResidualStream", path: Path) -> Path:
    """The residual stream's per-dimension RMS at each point (median, maximum and every outlier dimension; and as
    a map over points x dimensions), and the axes' sorted neuron norms over their median (heavy tails rise)."""
    from matplotlib.ticker import MaxNLocator

    fig, (lines, heat, tails) = _figure(3, ncols=3, size=(5.2, 3.6))
    x = np.arange(len(stream.points))
    rms = np.asarray(stream.rms)
    lines.plot(x, stream.median_rms, color="0.2", linewidth=2, label="median dim")
    lines.plot(x, stream.max_rms, color="0.6", linestyle="--", label="max dim")
    for o in stream.outliers[:8]:
        lines.plot(x, rms[:, o.dim], linewidth=1.2, label=f"dim {o.dim}")
    lines.set_yscale("log")
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines.set_xlabel("after (0 = embedding, k = block k-1)", fontsize=8)
    lines.set_ylabel("RMS over tokens", fontsize=8)
    lines.set_title(f"residual stream ({stream.token_count} tokens)", fontsize=9)
    lines.legend(fontsize=6)
    image = heat.imshow(np.log10(np.maximum(rms, 1e-12)), aspect="auto", interpolation="nearest", cmap="magma")
    fig.colorbar(image, ax=heat, label="log10 RMS")
    heat.set_xlabel("hidden dimension", fontsize=8)
    heat.set_ylabel("after (0 = embedding)", fontsize=8)
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat.set_title("per-dimension RMS", fontsize=9)
    layers = report.sizes["layers"]
    shown = [label for label, norms in report.neuron_norms().items()
             if ("@" not in label or label.split("@")[1] in {"0", str(layers // 2), str(layers - 1)})
             and norms.size >= 8]  # a handful of heads has no tail to speak of
    for label in shown[:8]:
        norms = np.sort(report.neuron_norms()[label])[::-1]
        median = np.median(norms)
        if median > 0:
            tails.plot(np.arange(1, norms.size + 1), norms / median, linewidth=1, label=label)
    tails.set_xscale("log")
    tails.set_yscale("log")
    tails.set_xlabel("neuron rank (largest first)", fontsize=8)
    tails.set_ylabel("norm / median", fontsize=8)
    tails.set_title("neuron norms per axis", fontsize=9)
    tails.legend(fontsize=6)
    for ax in (lines, heat, tails):
        ax.tick_params(labelsize=7)
    fig.suptitle(f"residual stream and neuron-norm tails: {report.checkpoint} ({stream.tokens})", fontsize=10)
    return _save(fig, path)


def write_plots(report: "InspectReport", out: Path) -> list[Path]:
    paths = [plot_norms(report, out / "norms.png"), plot_rc(report, out / "rc.png")]
    if report.residual is not None:
        paths.append(plot_residual(report, report.residual, out / "residual.png"))
    if report.compare is not None:
        paths.append(plot_qq(report, out / "qq.png"))
    return paths
