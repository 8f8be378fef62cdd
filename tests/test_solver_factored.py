"""The factored-residual greedy makes the same choices as the dense-residual greedy."""

import pytest
import torch

from subprune.solver import greedy_select
from subprune.solver_factored import greedy_select_factored


def _problem(rows: int, n: int, g: int, m: int, seed: int, asymmetric: bool = False, dead: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b = torch.relu(torch.randn(rows, n * g, generator=gen, dtype=torch.float64) + 0.3)
    if dead:
        b[:, : dead * g] = 0  # dead channels
        b[:, dead * g : 2 * dead * g] = b[:, 2 * dead * g : 3 * dead * g]  # duplicated channels
    a = b + 0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64) if asymmetric else b
    w = torch.randn(n * g, m, generator=gen, dtype=torch.float64)
    gram, cross = b.T @ b, (b.T @ a if asymmetric else None)
    energy = float(((a @ w) ** 2).sum())
    return gram, cross, w, energy


@pytest.mark.parametrize(
    "n, g, m, asymmetric, ridge, dead",
    [(40, 1, 7, False, 0.0, 0), (24, 9, 5, True, 0.0, 0), (30, 4, 3, False, 1e-3, 3), (20, 1, 6, True, 0.0, 2)],
)
def test_factored_greedy_equals_dense_residual_greedy(n, g, m, asymmetric, ridge, dead):
    gram, cross, w, energy = _problem(300, n, g, m, seed=n + g, asymmetric=asymmetric, dead=dead)
    k = n - 2 * dead if dead else n // 2  # past the live channels the gains are all 0 and ties are arbitrary
    gram_before = gram.clone()
    dense = greedy_select(gram, w, energy, g, k, cross=cross, ridge=ridge)
    factored = greedy_select_factored(gram, w, energy, g, k, cross=cross, ridge=ridge)
    assert factored.order.tolist() == dense.order.tolist()
    torch.testing.assert_close(factored.objective, dense.objective, rtol=1e-9, atol=1e-12)
    assert factored.ridge == dense.ridge
    assert torch.equal(gram, gram_before)  # read, never written


def test_factored_greedy_on_strongly_correlated_features_to_half_the_channels():
    idx = torch.arange(200, dtype=torch.float64)
    gram = 0.97 ** (idx[:, None] - idx[None, :]).abs()  # Kac-Murdock-Szego: neighbours nearly collinear
    w = torch.randn(200, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    energy = float((w * (gram @ w)).sum())
    dense = greedy_select(gram, w, energy, 1, 100)
    factored = greedy_select_factored(gram, w, energy, 1, 100)
    assert factored.order.tolist() == dense.order.tolist()
    torch.testing.assert_close(factored.gains, dense.gains, rtol=1e-6, atol=1e-12 * energy)


def test_factored_stochastic_greedy_follows_the_same_random_draws():
    gram, cross, w, energy = _problem(200, 50, 1, 4, seed=3)
    first = greedy_select(gram, w, energy, 1, 10, epsilon=0.2, generator=torch.Generator().manual_seed(5))
    second = greedy_select_factored(gram, w, energy, 1, 10, epsilon=0.2, generator=torch.Generator().manual_seed(5))
    assert second.order.tolist() == first.order.tolist()


def test_factored_greedy_refuses_bad_arguments():
    gram, _, w, energy = _problem(50, 6, 1, 2, seed=0)
    with pytest.raises(ValueError, match="k=7"):
        greedy_select_factored(gram, w, energy, 1, 7)
    with pytest.raises(ValueError, match="group_size"):
        greedy_select_factored(gram, w, energy, 4, 1)
