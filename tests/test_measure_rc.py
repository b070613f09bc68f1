"""The RC covariance test and the norm distances, on matrices whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from growkit.measure.rc import _Rotations, _row_stat, distance, rc_covariance_test


def rc_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """W[i, j] = w(r_i, c_j, noise): log-normal row and column scales through a nonlinearity, plus a row offset."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.exp(0.6 * torch.randn(m, 1, generator=gen))
    c = torch.exp(0.6 * torch.randn(1, n, generator=gen))
    return torch.tanh(r * c * torch.randn(m, n, generator=gen)) + 0.2 * r


def test_rc_matrix_passes():
    result = rc_covariance_test(rc_matrix(120, 90, seed=0), permutations=99)
    assert result is not None
    assert result.corr_row > 0.02 and result.corr_col > 0.02
    assert result.p_row == pytest.approx(0.01) and result.p_col == pytest.approx(0.01)  # the floor 1/(B+1)
    assert result.z_row > 10 and result.z_col > 10
    assert result.p_disjoint > 0.05 and abs(result.z_disjoint) < 2
    assert result.passes()
    # the mean over all disjoint pairs is pinned near -(row/m + col/n) by the matrix's own mean
    assert abs(result.disjoint_all) < 2 * (result.corr_row / 120 + result.corr_col / 90) + 1e-3


def test_iid_gaussian_matrix_has_no_row_or_column_covariance():
    w = torch.randn(120, 90, generator=torch.Generator().manual_seed(1))
    result = rc_covariance_test(w, permutations=99)
    assert abs(result.corr_row) < 0.005 and abs(result.corr_col) < 0.005 and abs(result.corr_disjoint) < 0.05
    # nothing is significant at 1% (each p-value is uniform under this null, so a fixed 1% risk per assertion)
    assert result.p_row > 0.01 and result.p_col > 0.01 and result.p_disjoint > 0.01
    assert not result.passes()


def test_index_structure_fails_the_disjoint_test():
    """Smooth structure along the indices (like position embeddings) is not exchangeable: neighbours covary."""
    i, j = torch.arange(100)[:, None], torch.arange(80)[None, :]
    envelope = 1.2 + torch.cos(2 * torch.pi * (i + j) / 12)
    w = envelope * torch.randn(100, 80, generator=torch.Generator().manual_seed(2))
    result = rc_covariance_test(w, permutations=99)
    assert result.p_disjoint == pytest.approx(0.01) and result.z_disjoint > 4
    assert not result.passes()


def test_p_values_are_calibrated_under_the_null():
    """Under an RC matrix, the disjoint p-value is uniform: about 10% of seeds fall below 0.1."""
    ps = [rc_covariance_test(rc_matrix(30, 30, seed=s), permutations=39, seed=s).p_disjoint for s in range(60)]
    assert 0.02 <= np.mean(np.array(ps) < 0.1) <= 0.25


@pytest.mark.parametrize("m, n", [(7, 5), (4, 9)])
def test_rotation_null_equals_the_rotated_matrices_statistic(m, n):
    """The row-sum shortcut gives `_row_stat` of the explicitly rotated matrices, rotating the right way."""
    gen = torch.Generator().manual_seed(m)
    d = torch.randn(m, n, generator=gen, dtype=torch.float64)
    offsets = torch.randint(m, (6, n), generator=gen)
    rotated = d[(torch.arange(m)[None, :, None] + offsets[:, None, :]) % m, torch.arange(n)]
    direct = _row_stat(rotated)
    assert torch.allclose(_Rotations(d).row_stat(offsets), direct, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(direct, _row_stat(d).expand(6))  # the rotations do change the statistic


def test_window_and_degenerate_inputs():
    big = rc_covariance_test(torch.randn(600, 40), permutations=9, max_dim=128)
    assert (big.rows, big.cols) == (128, 40)
    assert rc_covariance_test(torch.ones(10, 10)) is None
    assert rc_covariance_test(torch.randn(2, 50)) is None


def test_distances():
    gen = np.random.default_rng(0)
    a = gen.normal(size=5000)
    assert distance(a, a).w1 == 0 and distance(a, a).ks == 0
    shifted = distance(a, gen.normal(size=5000) + 0.5)
    assert shifted.w1 == pytest.approx(0.5, rel=0.1)
    assert shifted.ks_p < 1e-10
    same = distance(a, gen.normal(size=5000))
    assert same.w1 < 0.06 and same.ks_p > 0.01
