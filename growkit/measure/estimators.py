"""Estimators of a per-axis neuron measure: `empirical` (the atoms), `kde` (atoms plus a Gaussian kernel) and
`gaussian` (low-rank PCA plus an isotropic residual), behind one interface.

Everything is done in neuron space. A checkpoint's neuron features can be far too wide to hold (a hidden neuron of
a 7B model owns ~1.7M weights), but the `n x n` Gram matrix of its `n` neurons is small and can be summed tensor by
tensor. PCA of the centered Gram gives the principal scores, and every draw of every estimator is a linear
combination of the source neurons (`weights @ features`) plus, for `gaussian`, independent residual noise. That is
what makes sampling coherent: the same weights applied to a neuron's slice of every tensor give the same draw.

Held-out log-likelihoods are computed in the rank-`r` PCA projection fitted on the training neurons (the only space
in which all three are comparable): `kde` and `gaussian` have densities there; the empirical measure's atoms have
none (`-inf`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from growkit.errors import GrowkitError

DEFAULT_RANK = 8
_EIGH_MAX = 1500  # above this many neurons, top eigenpairs by randomized subspace iteration


@dataclass
class NeuronPCA:
    """PCA of `n` neurons with `dim`-wide features, known through their Gram matrix.

    `u` holds the top-`r` eigenvectors of the centered Gram (unit columns, orthogonal to the all-ones vector) and
    `s2` their eigenvalues (squared singular values of the centered features); `total` is the centered Gram's trace.
    `row_mean` and `grand` (the Gram's row means and mean) let new neurons be projected (`project`).
    """

    n: int
    dim: int
    u: torch.Tensor
    s2: torch.Tensor
    total: float
    row_mean: torch.Tensor
    grand: float
    spectrum: torch.Tensor  # every eigenvalue computed (descending), for reports

    @property
    def rank(self) -> int:
        return int(self.s2.numel())

    @property
    def variances(self) -> torch.Tensor:
        """Variance of each principal component (sample covariance eigenvalues)."""
        return self.s2 / max(self.n - 1, 1)

    @property
    def scores(self) -> torch.Tensor:
        """Principal coordinates of the fitted neurons, `(n, r)`."""
        return self.u * self.s2.sqrt()

    @property
    def explained(self) -> float:
        """Fraction of the total variance in the top-r components."""
        return float(self.s2.sum()) / self.total if self.total > 0 else 0.0

    @property
    def sigma2(self) -> float:
        """Isotropic residual variance per feature (probabilistic PCA's estimate: what the top r leave, per
        remaining dimension)."""
        if self.dim <= self.rank or self.n < 2:
            return 0.0
        return max(self.total - float(self.s2.sum()), 0.0) / ((self.n - 1) * (self.dim - self.rank))

    def effective_rank(self) -> float:
        """Participation ratio (sum lambda)^2 / sum lambda^2 of the computed spectrum."""
        lam = self.spectrum.clamp(min=0)
        denom = float((lam**2).sum())
        return float(lam.sum()) ** 2 / denom if denom > 0 else 0.0

    @classmethod
    def from_gram(cls, gram: torch.Tensor, dim: int, rank: int = DEFAULT_RANK) -> "NeuronPCA":
        g = gram.to(torch.float64)
        n = g.shape[0]
        row_mean = g.mean(1)
        grand = float(g.mean())
        gc = g - row_mean[None, :] - row_mean[:, None] + grand
        gc = (gc + gc.T) / 2
        total = float(torch.diagonal(gc).sum())
        lam, vec = _top_eigh(gc, rank)
        return cls._build(n, dim, lam, vec, total, row_mean, grand, rank)

    @classmethod
    def from_features(cls, x: torch.Tensor, rank: int = DEFAULT_RANK) -> "NeuronPCA":
        """PCA of explicit features `(n, dim)`: through the Gram when neurons are few, an SVD when they are many."""
        x = x.to(torch.float64)
        n, dim = x.shape
        if n <= dim or n <= _EIGH_MAX:
            return cls.from_gram(x @ x.T, dim, rank)
        mean = x.mean(0)
        xc = x - mean
        u, s, _ = torch.linalg.svd(xc, full_matrices=False)
        return cls._build(n, dim, s**2, u, float((xc**2).sum()), x @ mean, float(mean @ mean), rank)

    @classmethod
    def _build(cls, n: int, dim: int, lam: torch.Tensor, vec: torch.Tensor, total: float, row_mean: torch.Tensor,
               grand: float, rank: int) -> "NeuronPCA":
        lam = lam.clamp(min=0)
        positive = int((lam > 1e-12 * max(float(lam[0]) if lam.numel() else 0.0, 1e-300)).sum())
        # A rank-r density needs more than r + 1 points to have a non-singular covariance.
        r = max(0, min(rank, n - 2, positive))
        return cls(n=n, dim=dim, u=vec[:, :r].contiguous(), s2=lam[:r].contiguous(), total=total,
                   row_mean=row_mean, grand=grand, spectrum=lam)

    def project(self, cross: torch.Tensor) -> torch.Tensor:
        """Principal coordinates `(m, r)` of new neurons, from their Gram `(m, n)` against the fitted neurons."""
        cross = cross.to(torch.float64)
        kc = cross - cross.mean(1, keepdim=True) - self.row_mean[None, :] + self.grand
        return kc @ self.u / self.s2.sqrt()


def _top_eigh(gc: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric PSD matrix, descending: all of them when small, the top ones otherwise."""
    n = gc.shape[0]
    if n <= _EIGH_MAX:
        lam, vec = torch.linalg.eigh(gc)
        return lam.flip(0), vec.flip(1)
    gen = torch.Generator().manual_seed(0)
    q = min(n, rank + 16)
    basis = torch.linalg.qr(gc @ torch.randn(n, q, generator=gen, dtype=gc.dtype))[0]
    for _ in range(6):
        basis = torch.linalg.qr(gc @ basis)[0]
    small = basis.T @ gc @ basis
    lam, v = torch.linalg.eigh((small + small.T) / 2)
    return lam.flip(0), (basis @ v).flip(1)


@dataclass
class Mixing:
    """`m` draws from a fitted measure, as combinations of the source neurons.

    A draw's features are `weights @ source_features` (or the atoms themselves when `weights` is None) plus
    independent noise of variance `sigma2` per feature. `atoms` are the source neurons the draws start from (the
    kernel centres for `kde`, the atoms for `empirical`; for `gaussian` they only seed the gather).
    """

    atoms: torch.Tensor
    weights: torch.Tensor | None
    sigma2: float

    def dense(self, n: int) -> torch.Tensor:
        """The `(m, n)` weight matrix, one-hot rows for plain atoms."""
        if self.weights is not None:
            return self.weights
        return torch.nn.functional.one_hot(self.atoms, n).to(torch.float64)


class Estimator:
    """Fit a neuron measure (`fit` on explicit features, `fit_pca` on a Gram-based PCA), draw from it (`mixing`,
    `sample`) and score held-out neurons (`log_likelihood`)."""

    name = ""
    #: whether draws carry the isotropic residual (then callers that sample tensor by tensor need its variance)
    uses_residual = False
    #: whether draws depend on anything beyond the atoms (no PCA is needed otherwise)
    needs_pca = True

    def __init__(self, rank: int = DEFAULT_RANK) -> None:
        if rank < 0:
            raise GrowkitError(f"estimator rank must be >= 0, got {rank}")
        self.rank = rank
        self.pca: NeuronPCA | None = None
        self._x: torch.Tensor | None = None

    def fit(self, x: torch.Tensor) -> "Estimator":
        """Fit on explicit features `(n, dim)`."""
        self._x = x.to(torch.float64)
        self.pca = NeuronPCA.from_features(self._x, self.rank)
        return self

    def fit_pca(self, pca: NeuronPCA) -> "Estimator":
        """Fit from a PCA computed elsewhere (e.g. from a Gram matrix summed tensor by tensor)."""
        self.pca = pca
        self._x = None
        return self

    def _fitted(self) -> NeuronPCA:
        if self.pca is None:
            raise RuntimeError(f"{self.name} estimator used before fit")
        return self.pca

    def mixing(self, m: int, gen: torch.Generator, atoms: torch.Tensor | None = None) -> Mixing:
        """`m` draws; `atoms` (the source neuron each starts from) are drawn uniformly if not given."""
        pca = self._fitted()
        if atoms is None:
            atoms = torch.randint(pca.n, (m,), generator=gen)
        return self._mix(pca, atoms, gen)

    def _mix(self, pca: NeuronPCA, atoms: torch.Tensor, gen: torch.Generator) -> Mixing:
        raise NotImplementedError

    def around_atoms(self, m: int, gen: torch.Generator) -> torch.Tensor | None:
        """`m` draws of the measure's spread around an atom, as principal scores `(m, r)` (the offset of a draw from
        its atom is `scores @ pca.u.T` in neuron space); None when the measure has no such spread in the PCA space
        (the atoms themselves, or a spread that is only the isotropic residual)."""
        return None

    def sample(self, m: int, gen: torch.Generator, chunk: int = 4096) -> torch.Tensor:
        """`m` explicit feature vectors drawn from the measure fitted by `fit` (in chunks, to bound memory)."""
        if self._x is None:
            raise RuntimeError("sample() needs explicit features: call fit(x) first")
        parts = []
        for start in range(0, m, chunk):
            mix = self.mixing(min(chunk, m - start), gen)
            out = mix.dense(self._x.shape[0]) @ self._x
            if mix.sigma2 > 0:
                out = out + torch.randn(out.shape, generator=gen, dtype=out.dtype) * math.sqrt(mix.sigma2)
            parts.append(out)
        return torch.cat(parts) if parts else self._x[:0]

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of points `(m, r)` in the fitted PCA coordinates."""
        raise NotImplementedError

    def log_likelihood(self, x_test: torch.Tensor) -> float:
        """Mean log density per held-out neuron, in the rank-r projection fitted on the training neurons."""
        if self._x is None:
            raise RuntimeError("log_likelihood() needs explicit features: call fit(x) first")
        z = self._fitted().project(x_test.to(torch.float64) @ self._x.T)
        return float(self.log_density(z).mean())


class Empirical(Estimator):
    """The atoms themselves: a draw is a copy of a source neuron (Net2Net's sampler, with mean-field scaling)."""

    name = "empirical"
    needs_pca = False

    def mixing(self, m: int, gen: torch.Generator, atoms: torch.Tensor | None = None) -> Mixing:
        if atoms is None:
            atoms = torch.randint(self._fitted().n, (m,), generator=gen)
        return Mixing(atoms=atoms, weights=None, sigma2=0.0)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0],), -math.inf, dtype=torch.float64)


class KDE(Estimator):
    """Atoms plus a Gaussian kernel in the top-r PCA subspace, with Scott's rule: the kernel covariance is
    `h^2` times the sample covariance of the projected neurons, `h = n^(-1/(r+4))` (scipy's `gaussian_kde`)."""

    name = "kde"

    def bandwidth(self) -> float:
        pca = self._fitted()
        return pca.n ** (-1.0 / (pca.rank + 4)) if pca.rank else 0.0

    def _mix(self, pca: NeuronPCA, atoms: torch.Tensor, gen: torch.Generator) -> Mixing:
        weights = torch.nn.functional.one_hot(atoms, pca.n).to(torch.float64)
        scores = self.around_atoms(len(atoms), gen)
        if scores is not None:
            weights = weights + scores @ pca.u.T
        return Mixing(atoms=atoms, weights=weights, sigma2=0.0)

    def around_atoms(self, m: int, gen: torch.Generator) -> torch.Tensor | None:
        pca = self._fitted()
        if not pca.rank:
            return None
        # kernel step V_r diag(h sqrt(var)) z = X_c^T U_r (h / sqrt(n-1)) z
        z = torch.randn(m, pca.rank, generator=gen, dtype=torch.float64)
        return (self.bandwidth() / math.sqrt(pca.n - 1)) * z

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        pca = self._fitted()
        if not pca.rank:
            return torch.full((z.shape[0],), math.nan, dtype=torch.float64)
        var = pca.variances * self.bandwidth() ** 2
        parts = []
        for start in range(0, z.shape[0], 256):  # (points x atoms x r) a chunk of points at a time
            diff = (z[start:start + 256, None, :] - pca.scores[None, :, :]) ** 2 / var
            log_kernel = -0.5 * (diff.sum(-1) + torch.log(2 * math.pi * var).sum())
            parts.append(torch.logsumexp(log_kernel, dim=1) - math.log(pca.n))
        return torch.cat(parts) if parts else z.new_zeros(0)


class Gaussian(Estimator):
    """Low-rank Gaussian: the mean, the top-r principal components with their variances, and an isotropic residual
    carrying the variance the top r leave (probabilistic PCA)."""

    name = "gaussian"
    uses_residual = True

    def _mix(self, pca: NeuronPCA, atoms: torch.Tensor, gen: torch.Generator) -> Mixing:
        # mean + V_r diag(sqrt(var)) z = X^T (1/n + U_r z / sqrt(n-1))
        weights = torch.full((len(atoms), pca.n), 1.0 / pca.n, dtype=torch.float64)
        if pca.rank:
            z = torch.randn(len(atoms), pca.rank, generator=gen, dtype=torch.float64)
            weights = weights + z @ pca.u.T / math.sqrt(pca.n - 1)
        return Mixing(atoms=atoms, weights=weights, sigma2=pca.sigma2)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        var = self._fitted().variances
        if not var.numel():
            return torch.full((z.shape[0],), math.nan, dtype=torch.float64)
        return -0.5 * ((z**2 / var).sum(-1) + torch.log(2 * math.pi * var).sum())


ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (Empirical, KDE, Gaussian)}


def get_estimator(name: str, rank: int = DEFAULT_RANK) -> Estimator:
    if name not in ESTIMATORS:
        raise GrowkitError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](rank=rank)


def held_out_log_likelihood(gram: torch.Tensor, dim: int, names: list[str] | tuple[str, ...] = tuple(ESTIMATORS),
                            rank: int = DEFAULT_RANK, test_fraction: float = 0.2,
                            seed: int = 0) -> tuple[dict[str, float | None], int]:
    """Mean held-out log-likelihood per neuron for each estimator, from the full Gram matrix of an axis.

    Neurons are split at random (seeded); every estimator is fitted on the training neurons and scored on the
    held-out ones in the training PCA's rank-r projection. Returns ({name: value or None}, r); None where the axis
    is too small for a projection (fewer than r + 2 training neurons, or no variance).
    """
    n = gram.shape[0]
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 3:
        return {k: None for k in names}, 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    pca = NeuronPCA.from_gram(gram[train][:, train], dim, rank)
    if not pca.rank:
        return {k: None for k in names}, 0
    z = pca.project(gram[test][:, train])
    out: dict[str, float | None] = {}
    for name in names:
        value = float(get_estimator(name, rank).fit_pca(pca).log_density(z).mean())
        out[name] = value if math.isfinite(value) or value == -math.inf else None
    return out, pca.rank
