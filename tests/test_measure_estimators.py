"""Estimators recover known parameters from synthetic neurons; Gram-space and explicit routes agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from growkit.errors import GrowkitError
from growkit.measure.estimators import (
    KDE, Empirical, Gaussian, NeuronPCA, get_estimator, held_out_log_likelihood,
)


def gaussian_neurons(n: int, seed: int = 0, dim: int = 20, variances=(9.0, 4.0), sigma: float = 0.5):
    """Neurons from a known low-rank Gaussian: mean, two orthonormal directions with variances, isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(dim, len(variances), generator=gen, dtype=torch.float64))[0]
    z = torch.randn(n, len(variances), generator=gen, dtype=torch.float64) * torch.tensor(variances).sqrt()
    x = mean + z @ basis.T + sigma * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    cov = basis @ torch.diag(torch.tensor(variances, dtype=torch.float64)) @ basis.T + sigma**2 * torch.eye(dim)
    return x, mean, basis, cov


def test_gaussian_recovers_mean_components_and_residual():
    x, mean, basis, cov = gaussian_neurons(4000)
    est = Gaussian(rank=2).fit(x)
    pca = est.pca
    # component variances are the true ones plus the residual along them: 9.25 and 4.25, within 8%
    # (sampling sd of a variance from 4000 points is ~2.2%)
    assert torch.allclose(pca.variances, torch.tensor([9.25, 4.25], dtype=torch.float64), rtol=0.08)
    assert pca.sigma2 == pytest.approx(0.25, rel=0.05)
    # principal subspace: the recovered directions span the true ones (cosines of principal angles > 0.99)
    directions = (x - x.mean(0)).T @ pca.u / pca.s2.sqrt()
    cosines = torch.linalg.svdvals(basis.T @ directions)
    assert float(cosines.min()) > 0.99
    samples = est.sample(10000, torch.Generator().manual_seed(1))
    assert float((samples.mean(0) - mean).abs().max()) < 0.15
    rel = float(torch.linalg.norm(torch.cov(samples.T) - cov) / torch.linalg.norm(cov))
    assert rel < 0.08, rel


def test_kde_uses_scotts_rule_and_matches_scipy():
    from scipy.stats import gaussian_kde

    x, *_ = gaussian_neurons(300, seed=2)
    est = KDE(rank=2).fit(x[:240])
    pca = est.pca
    ref = gaussian_kde(pca.scores.numpy().T)  # default bandwidth: Scott's rule
    assert est.bandwidth() == pytest.approx(ref.factor, rel=1e-12)
    z = pca.project(x[240:] @ x[:240].T)
    assert np.allclose(est.log_density(z).numpy(), ref.logpdf(z.numpy().T), rtol=1e-8, atol=1e-10)
    assert est.log_likelihood(x[240:]) == pytest.approx(float(ref.logpdf(z.numpy().T).mean()), rel=1e-8)


def test_kde_draws_are_atoms_plus_a_kernel_of_the_right_width():
    x, *_ = gaussian_neurons(500, seed=3)
    est = KDE(rank=2).fit(x)
    samples = est.sample(40000, torch.Generator().manual_seed(4))
    scores = est.pca.project(samples @ x.T)
    # a KDE draw's variance along each component is the data's times (1 + h^2)
    expected = est.pca.variances * (1 + est.bandwidth() ** 2)
    assert torch.allclose(scores.var(0), expected, rtol=0.05)
    assert torch.allclose(samples.mean(0), x.mean(0), atol=0.1)


def test_empirical_draws_atoms_and_has_no_density():
    x, *_ = gaussian_neurons(50, seed=5)
    est = Empirical(rank=2).fit(x)
    samples = est.sample(200, torch.Generator().manual_seed(6))
    distances = (samples[:, None, :] - x[None, :, :]).abs().sum(-1).min(1).values
    assert float(distances.max()) == 0.0
    assert est.log_likelihood(x[:5]) == -math.inf


def test_mixing_weights_average_to_the_uniform_measure():
    """Every estimator's draws are, on average, the mean neuron: linear functions are preserved in expectation."""
    x, *_ = gaussian_neurons(40, seed=7)
    for name in ("empirical", "kde", "gaussian"):
        est = get_estimator(name, rank=3).fit(x)
        w = est.mixing(20000, torch.Generator().manual_seed(8)).dense(40)
        assert torch.allclose(w.sum(1), torch.ones(20000, dtype=torch.float64), atol=1e-9)
        assert float((w.mean(0) - 1 / 40).abs().max()) < 3e-3, name


def test_held_out_likelihood_prefers_the_right_model():
    gauss, *_ = gaussian_neurons(600, seed=9)
    ll, r = held_out_log_likelihood(gauss @ gauss.T, gauss.shape[1], rank=2)
    assert r == 2 and ll["empirical"] == -math.inf
    assert ll["gaussian"] > ll["kde"]
    gen = torch.Generator().manual_seed(10)
    centres = torch.randn(2, 20, generator=gen, dtype=torch.float64) * 4
    bimodal = centres[torch.randint(2, (600,), generator=gen)] + torch.randn(600, 20, generator=gen,
                                                                             dtype=torch.float64) * 0.3
    ll, _ = held_out_log_likelihood(bimodal @ bimodal.T, 20, rank=2)
    assert ll["kde"] > ll["gaussian"] + 0.5


def test_gram_route_matches_explicit_route():
    x, *_ = gaussian_neurons(120, seed=11)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    test, train = perm[:24], perm[24:]
    explicit = Gaussian(rank=2).fit(x[train]).log_likelihood(x[test])
    gram = x @ x.T
    via_gram, _ = held_out_log_likelihood(gram, x.shape[1], names=("gaussian",), rank=2, test_fraction=0.2)
    assert via_gram["gaussian"] == pytest.approx(explicit, rel=1e-9)


def test_large_axes_use_randomized_top_eigenpairs():
    x, *_ = gaussian_neurons(1600, seed=12, dim=12)
    via_svd = NeuronPCA.from_features(x, rank=2)  # n > dim: SVD of the centred features
    via_gram = NeuronPCA.from_gram(x @ x.T, 12, rank=2)  # n > 1500: randomized subspace iteration
    assert torch.allclose(via_gram.s2, via_svd.s2, rtol=1e-6)
    assert torch.allclose((via_gram.u.T @ via_svd.u).abs(), torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert via_gram.total == pytest.approx(via_svd.total, rel=1e-9)


def test_unknown_estimator_is_a_user_error():
    with pytest.raises(GrowkitError, match="unknown estimator"):
        get_estimator("histogram")
