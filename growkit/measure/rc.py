"""RC-ansatz diagnostics: the covariance test of squared entries, and distances between norm distributions.

(a) If `W[i, j] = w(r_i, c_j)` with i.i.d. row labels and i.i.d. column labels, squared entries that share a row
covary (through `r_i`), entries that share a column covary (through `c_j`), and entries in disjoint rows and
columns are independent. With `D = W**2 - mean(W**2)`:

- `row`: mean of `D[i, j] D[i, k]` over distinct j, k (a U-statistic), divided by Var(W**2): a correlation.
  p-value: randomization test that rotates each column by an independent random offset (if entries are
  exchangeable within columns, i.e. there is no row effect, the matrix's law is invariant under these rotations;
  column effects are kept).
- `col`: the same with rows and columns swapped.
- `disjoint`: mean of `D[i, j] D[i+1, j+1]`, entries in disjoint rows and columns that are neighbours by index.
  Under the ansatz labels are exchangeable, so index neighbours are just another disjoint pair; the p-value
  (two-sided) compares it with the same statistic after random row and column permutations, which is exactly its
  distribution when rows and columns are exchangeable. Index structure the ansatz cannot express (smooth position
  embeddings, head blocks inside a flattened dimension, RoPE pairs) shows up here.

Why not the mean over *all* disjoint pairs: with the matrix's own mean, the sum over all pairs of D products is
zero, which pins that mean at about `-(row/m + col/n)` whatever the matrix is. It is reported (`disjoint_all`) but
tests nothing.

(b) Wasserstein-1 and Kolmogorov-Smirnov distances between two samples (row norms, column norms or entries).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

_CHUNK = 32


class RCTest(BaseModel):
    """Result of the RC covariance test on one matrix (correlations of squared entries, permutation p-values,
    and z-scores against the permutation null, which keep their meaning when p hits its floor 1/(B+1))."""

    rows: int
    cols: int
    corr_row: float
    corr_col: float
    corr_disjoint: float
    p_row: float
    p_col: float
    p_disjoint: float
    z_row: float
    z_col: float
    z_disjoint: float
    disjoint_all: float
    permutations: int

    def passes(self, alpha: float = 0.01) -> bool:
        """The ansatz's prediction: row and column covariances significant, disjoint not."""
        return self.p_row < alpha and self.p_col < alpha and self.p_disjoint >= alpha


def _row_stat(d: torch.Tensor) -> torch.Tensor:
    """Mean product of centred squared entries over distinct pairs in the same row; works on batches (..., m, n)."""
    m, n = d.shape[-2:]
    return ((d.sum(-1) ** 2).sum(-1) - (d**2).sum((-2, -1))) / (m * n * (n - 1))


class _Rotations:
    """`_row_stat` of a matrix whose columns are each rotated (cyclically shifted) by their own offset.

    Rotations keep the sum of squares, so only the rotated matrix's row sums are new. With the matrix stacked on
    itself and laid out column by column, rotated column j is the contiguous run of m values starting at
    `j * 2m + offset_j`, and `embedding_bag` sums those runs for every row at once, without building the rotated
    matrices (the same numbers as gathering them, up to summation order)."""

    def __init__(self, d: torch.Tensor) -> None:
        self.m, self.n = d.shape
        flat = torch.cat([d, d]).T.contiguous().flatten()
        self.runs = flat.as_strided((flat.numel() - self.m + 1, self.m), (1, 1))
        self.starts = torch.arange(self.n) * 2 * self.m
        self.sum_sq = float((d**2).sum())

    def row_stat(self, offsets: torch.Tensor) -> torch.Tensor:
        """The statistic for each row of `offsets` (b, n): column j moved so that row i holds `d[(i + o_j) % m, j]`."""
        sums = F.embedding_bag(offsets + self.starts, self.runs, mode="sum")  # (b, m) row sums
        return ((sums**2).sum(-1) - self.sum_sq) / (self.m * self.n * (self.n - 1))


def _neighbour_stat(d: torch.Tensor) -> torch.Tensor:
    return (d[..., :-1, :-1] * d[..., 1:, 1:]).mean((-2, -1))


def _window(n: int, size: int, gen: torch.Generator) -> slice:
    if n <= size:
        return slice(0, n)
    start = int(torch.randint(n - size + 1, (1,), generator=gen))
    return slice(start, start + size)


def _p_greater(obs: float, null: torch.Tensor) -> float:
    return float((1 + (null >= obs).sum()) / (null.numel() + 1))


def _p_two_sided(obs: float, null: torch.Tensor) -> float:
    centre = null.mean()
    return float((1 + ((null - centre).abs() >= abs(obs - centre) - 1e-15).sum()) / (null.numel() + 1))


def _z(obs: float, null: torch.Tensor) -> float:
    std = float(null.std()) if null.numel() > 1 else 0.0
    return (obs - float(null.mean())) / std if std > 0 else 0.0


def rc_covariance_test(w: torch.Tensor, permutations: int = 199, max_dim: int = 256, seed: int = 0) -> RCTest | None:
    """Run the test on a matrix (a contiguous window of at most `max_dim` rows and columns, chosen by `seed`).

    Returns None for matrices with fewer than 3 rows or columns or constant squared entries.
    """
    gen = torch.Generator().manual_seed(seed)
    w = w.detach()[_window(w.shape[0], max_dim, gen)][:, _window(w.shape[1], max_dim, gen)].to(torch.float64)
    m, n = w.shape
    e = w**2
    d = e - e.mean()
    var = float((d**2).mean())
    if m < 3 or n < 3 or var <= 0:
        return None
    d = d / var**0.5  # statistics below are correlations
    obs_row, obs_col, obs_dis = float(_row_stat(d)), float(_row_stat(d.T)), float(_neighbour_stat(d))
    total = float(d.sum())
    all_pairs = (total**2 - float((d.sum(1) ** 2).sum()) - float((d.sum(0) ** 2).sum()) + float((d**2).sum()))
    disjoint_all = all_pairs / (m * (m - 1) * n * (n - 1))

    null_row, null_col, null_dis = [], [], []
    rot_cols, rot_rows = _Rotations(d), _Rotations(d.T)
    for start in range(0, permutations, _CHUNK):
        b = min(_CHUNK, permutations - start)
        # Independent random rotations of every column (row) are a group under which the null is invariant,
        # so they give an exact randomization test, and cost a gather instead of a sort.
        null_row.append(rot_cols.row_stat(torch.randint(m, (b, 1, n), generator=gen)[:, 0]))
        null_col.append(rot_rows.row_stat(torch.randint(n, (b, m, 1), generator=gen)[..., 0]))
        pr = torch.rand(b, m, generator=gen).argsort(1)
        pc = torch.rand(b, n, generator=gen).argsort(1)
        null_dis.append(_neighbour_stat(d[pr].gather(2, pc[:, None, :].expand(b, m, n))))
    nr, nc, nd = torch.cat(null_row), torch.cat(null_col), torch.cat(null_dis)
    return RCTest(rows=m, cols=n, corr_row=obs_row, corr_col=obs_col, corr_disjoint=obs_dis,
                  p_row=_p_greater(obs_row, nr), p_col=_p_greater(obs_col, nc), p_disjoint=_p_two_sided(obs_dis, nd),
                  z_row=_z(obs_row, nr), z_col=_z(obs_col, nc), z_disjoint=_z(obs_dis, nd),
                  disjoint_all=disjoint_all, permutations=permutations)


class Distance(BaseModel):
    """Wasserstein-1 (absolute, and relative to the first sample's mean absolute value) and two-sample KS."""

    w1: float
    w1_rel: float
    ks: float
    ks_p: float
    n_a: int
    n_b: int


def distance(a: np.ndarray, b: np.ndarray) -> Distance:
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    w1 = float(stats.wasserstein_distance(a, b))
    scale = float(np.abs(a).mean())
    ks = stats.ks_2samp(a, b)
    return Distance(w1=w1, w1_rel=w1 / scale if scale > 0 else 0.0, ks=float(ks.statistic), ks_p=float(ks.pvalue),
                    n_a=a.size, n_b=b.size)
