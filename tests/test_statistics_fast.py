"""The cheaper statistics products: G on its upper block triangle, energies from the dense consumer's output,
non-finite inputs read off the diagonals; each against the direct float64 products."""

from __future__ import annotations

import pytest
import torch

from subprune.statistics import SYMMETRIC_BLOCK, GramStatistics, NonFiniteActivationError


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.rand(d, generator=gen) ** 3  # columns of very unequal scale


@pytest.mark.parametrize("d", [SYMMETRIC_BLOCK - 1, SYMMETRIC_BLOCK + 1, 3 * SYMMETRIC_BLOCK, 3 * SYMMETRIC_BLOCK + 50])
def test_gram_on_the_upper_block_triangle_is_the_full_product(d):
    stats = GramStatistics(d, sums=True)
    direct = torch.zeros(d, d, dtype=torch.float64)
    for seed in range(3):  # several updates: the lower triangle is filled in on reading, after all of them
        b = _rows(257, d, seed)
        stats.update(b)
        direct.addmm_(b.double().T, b.double())
    gram = stats.gram_
    if d > SYMMETRIC_BLOCK:  # (at or below one block G is the one full product, as symmetric as the BLAS makes it)
        assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, direct, rtol=1e-13, atol=0)
    if torch.backends.mkl.is_available():  # the same inner dimension in each block: MKL gives the same bits
        assert torch.equal(gram, direct)
    stats.update(_rows(5, d, 9))  # reading did not stop later updates from landing
    direct.addmm_(_rows(5, d, 9).double().T, _rows(5, d, 9).double())
    torch.testing.assert_close(stats.gram_, direct, rtol=1e-13, atol=0)


def test_gram_assigned_or_added_stays_symmetric():
    d = 2 * SYMMETRIC_BLOCK + 7
    left, right = GramStatistics(d), GramStatistics(d)
    left.update(_rows(100, d, 1))
    right.update(_rows(90, d, 2))
    direct = left.gram_.clone() + right.gram_
    left.update(torch.zeros(1, d))  # lower triangle stale again before the addition
    left.add_(right)
    torch.testing.assert_close(left.gram_, direct, rtol=1e-13, atol=0)
    left.gram_ = torch.eye(d, dtype=torch.float64)
    assert torch.equal(left.gram_, torch.eye(d, dtype=torch.float64))


def test_energy_from_the_dense_output_matches_the_product():
    d, m = 300, 40
    w = torch.randn(d, m, generator=torch.Generator().manual_seed(3))
    direct = GramStatistics(d, asymmetric=True, sums=True, target_weight=w)
    given = GramStatistics(d, asymmetric=True, sums=True, target_weight=w)
    for seed in range(2):
        b, a = _rows(64, d, seed), _rows(64, d, seed + 10)
        direct.update(b, a)
        output = a @ w  # what the dense consumer computes in float32
        given.update(b, a, energy=output.double().square().sum())
    assert given.target_energy(w) == pytest.approx(direct.target_energy(w), rel=1e-6)
    assert torch.equal(given.cross_, direct.cross_) and torch.equal(given.gram_, direct.gram_)
    with pytest.raises(ValueError, match="target_weight"):
        GramStatistics(d, asymmetric=True).update(b, a, energy=1.0)


@pytest.mark.parametrize("where, bad", [("b", float("nan")), ("b", float("inf")), ("a", float("nan")),
                                        ("a", float("-inf"))])
@pytest.mark.parametrize("target_weight", [False, True])
def test_non_finite_rows_are_refused(where, bad, target_weight):
    d = SYMMETRIC_BLOCK + 20
    b, a = _rows(50, d, 0), _rows(50, d, 1)
    b[:, 7] = 0.0  # a zero where the target holds inf: 0 * inf is NaN, still caught
    (b if where == "b" else a)[13, 7 if where == "a" else d - 1] = bad
    stats = GramStatistics(d, asymmetric=True, target_weight=torch.ones(d, 2) if target_weight else None)
    label = "the input" if where == "b" else "the dense-model input"
    with pytest.raises(NonFiniteActivationError, match=label):
        stats.update(b, a)
