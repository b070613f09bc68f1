"""Per-tensor statistics of rows and columns: norms, means, variances and kurtosis, in mean-field units.

A 2-D tensor is viewed as a matrix whose rows index what it writes (its `out` dimension, or the neurons an
embedding writes) and whose columns index what it reads (its `in` dimension, or the tokens/positions of an
embedding). A row or column "norm" is its root-mean-square entry (norm / sqrt(length)), so that widths compare.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel

from growkit.arch.spec import Sizes, TensorSpec
from growkit.measure.features import fan_in, unit_factor


class Summary(BaseModel):
    """Mean, standard deviation and excess kurtosis of a set of values."""

    mean: float
    std: float
    kurtosis: float | None


class SideStats(BaseModel):
    """Statistics of the rows (or columns) of a matrix: their RMS norms, and per-row mean, variance and kurtosis
    of the entries, averaged over rows."""

    count: int
    length: int
    norm_mean: float
    norm_std: float
    mean_mean: float
    var_mean: float
    kurtosis_mean: float | None


class TensorStats(BaseModel):
    name: str
    template: str
    layer: int | None
    kind: str
    shape: list[int]
    fan_in: int
    unit: float
    rows_axis: str | None = None
    cols_axis: str | None = None
    entries: Summary
    rows: SideStats | None = None
    cols: SideStats | None = None


def _none_if_nan(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def summary(values: np.ndarray) -> Summary:
    from scipy import stats

    values = np.asarray(values, dtype=np.float64).ravel()
    kurt = stats.kurtosis(values) if values.size > 3 and values.std() > 0 else float("nan")
    return Summary(mean=float(values.mean()), std=float(values.std()), kurtosis=_none_if_nan(kurt))


class TailStats(BaseModel):
    """How heavy the upper tail of a set of positive values (an axis's neuron norms) is: excess kurtosis, the largest
    over the median, and the Hill estimate of the tail index from the top tenth (smaller = heavier; None below 20
    values), with the index of the largest value."""

    count: int
    kurtosis: float | None
    max_over_median: float | None
    hill_alpha: float | None
    top: int


def tail_stats(values: np.ndarray) -> TailStats:
    from scipy import stats

    x = np.asarray(values, dtype=np.float64).ravel()
    kurt = stats.kurtosis(x) if x.size > 3 and x.std() > 0 else float("nan")
    median = float(np.median(x))
    hill = float("nan")
    if x.size >= 20:
        desc = np.sort(x)[::-1]
        k = max(2, x.size // 10)
        log_excess = float(np.mean(np.log(desc[:k] / desc[k]))) if desc[k] > 0 else 0.0
        hill = 1.0 / log_excess if log_excess > 0 else float("nan")
    return TailStats(count=int(x.size), kurtosis=_none_if_nan(kurt),
                     max_over_median=float(x.max() / median) if median > 0 else None,
                     hill_alpha=_none_if_nan(hill), top=int(x.argmax()))


def side_stats(m: np.ndarray) -> tuple[SideStats, np.ndarray]:
    """Statistics of the rows of `m`, and the rows' RMS norms."""
    from scipy import stats

    norms = np.sqrt((m**2).mean(1))
    std = m.std(1)
    with np.errstate(all="ignore"):
        kurt = stats.kurtosis(m, axis=1) if m.shape[1] > 3 else np.full(m.shape[0], np.nan)
    kurt = kurt[np.isfinite(kurt) & (std > 0)]
    return SideStats(count=m.shape[0], length=m.shape[1], norm_mean=float(norms.mean()), norm_std=float(norms.std()),
                     mean_mean=float(m.mean(1).mean()), var_mean=float((std**2).mean()),
                     kurtosis_mean=float(kurt.mean()) if kurt.size else None), norms


def matrix_view(x: torch.Tensor, spec: TensorSpec) -> tuple[torch.Tensor, str, str] | None:
    """A 2-D tensor as (rows = written side, columns = read side), with the axes each spans; None for 1-D."""
    if x.dim() != 2:
        return None
    roles = [d.role for d in spec.dims]
    col = roles.index("in") if "in" in roles else (roles.index("elem") if "elem" in roles else 1)
    row = 1 - col
    m = x if col == 1 else x.T
    return m, "x".join(spec.dims[row].axes), "x".join(spec.dims[col].axes)


def tensor_stats(x: torch.Tensor, spec: TensorSpec, layer: int | None, sizes: Sizes, units: str = "mf",
                 tied: bool = False) -> tuple[TensorStats, dict[str, np.ndarray]]:
    """Statistics of one tensor in the given units, and its row/column norms (or entries, for 1-D tensors)."""
    unit = unit_factor(spec, sizes, units, tied)
    y = x.to(torch.float64) * unit
    base = dict(name=spec.at(layer), template=spec.name, layer=layer, kind=spec.kind, shape=list(x.shape),
                fan_in=fan_in(spec, sizes, tied), unit=unit, entries=summary(y.numpy()))
    view = matrix_view(y, spec)
    if view is None:
        return TensorStats(**base), {"entries": y.numpy().ravel()}
    m, rows_axis, cols_axis = view
    arr = m.numpy()
    rows, row_norms = side_stats(arr)
    cols, col_norms = side_stats(arr.T)
    return (TensorStats(**base, rows_axis=rows_axis, cols_axis=cols_axis, rows=rows, cols=cols),
            {"rows": row_norms, "cols": col_norms})
