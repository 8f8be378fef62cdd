"""The Gram-form greedy against direct least squares, naive greedy and brute force."""

import math

import pytest
import torch

from subprune.reference import brute_force, kept_energy, naive_greedy
from subprune.solver import greedy_select, group_columns, refit, weights_objective


def _site(rows, groups, group_size, outputs, seed, asym=False):
    gen = torch.Generator().manual_seed(seed)
    d = groups * group_size
    mixing = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    b = torch.relu(torch.randn(rows, d, generator=gen, dtype=torch.float64) @ (torch.eye(d) + mixing))
    w = torch.randn(d, outputs, generator=gen, dtype=torch.float64)
    a = b + 0.3 * torch.randn(rows, d, generator=gen, dtype=torch.float64) if asym else None
    return b, a, w


def _greedy(b, w, group_size, k, a=None, **kw):
    target = b if a is None else a
    energy = float(((target @ w) ** 2).sum())
    cross = None if a is None else b.T @ a
    return greedy_select(b.T @ b, w, energy, group_size, k, cross=cross, **kw)


@pytest.mark.parametrize("group_size", [1, 4, 9])
@pytest.mark.parametrize("asym", [False, True])
def test_greedy_equals_naive_greedy(group_size, asym):
    b, a, w = _site(rows=300, groups=10, group_size=group_size, outputs=5, seed=group_size, asym=asym)
    result = _greedy(b, w, group_size, 10, a)
    order, objective = naive_greedy(b, w, group_size, 10, a=a)
    assert result.order.tolist() == order.tolist()
    torch.testing.assert_close(result.objective, objective, atol=1e-10, rtol=0)
    # the curve is increasing and ends at the full-refit value (1 for the symmetric target)
    assert bool((result.gains >= 0).all())
    if not asym:
        assert result.objective[-1].item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("group_size,k", [(1, 3), (3, 2), (1, 5)])
def test_greedy_within_guarantee_of_brute_force(group_size, k):
    b, _, w = _site(rows=200, groups=8, group_size=group_size, outputs=4, seed=10 + k)
    result = _greedy(b, w, group_size, k)
    _, best = brute_force(b, w, group_size, k)
    greedy_value = result.objective[-1].item()
    assert greedy_value <= best + 1e-12
    # (1 - 1/e) is the guarantee for gamma = 1; greedy is in practice much closer.
    assert greedy_value >= (1 - math.exp(-1)) * best
    assert greedy_value >= 0.9 * best


def test_refit_equals_least_squares():
    b, a, w = _site(rows=400, groups=6, group_size=4, outputs=3, seed=3, asym=True)
    keep = torch.tensor([0, 2, 5])
    cols = group_columns(keep, 4)
    for target_input, cross in ((b, None), (a, b.T @ a)):
        expected = torch.linalg.lstsq(b[:, cols], target_input @ w).solution
        got = refit(b.T @ b, w, keep, 4, cross=cross)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
        energy = float(((target_input @ w) ** 2).sum())
        f = weights_objective(b.T @ b, w, energy, keep, got, 4, cross=cross)
        assert f == pytest.approx(kept_energy(b, target_input @ w, keep.tolist(), 4) / energy, abs=1e-10)


def test_prefix_refit_matches_curve():
    b, _, w = _site(rows=300, groups=8, group_size=2, outputs=4, seed=5)
    result = _greedy(b, w, 2, 8)
    energy = result.target_energy
    for k in (1, 3, 6):
        keep = result.keep(k)
        new_w = refit(b.T @ b, w, keep, 2)
        f = weights_objective(b.T @ b, w, energy, keep, new_w, 2)
        assert f == pytest.approx(result.objective[k - 1].item(), abs=1e-10)


def test_dead_and_duplicate_channels_gain_zero_not_nan():
    b, _, w = _site(rows=200, groups=6, group_size=3, outputs=4, seed=7)
    b[:, 3:6] = 0.0  # group 1 dead (ReLU never fires)
    b[:, 12:15] = b[:, 0:3]  # group 4 duplicates group 0
    result = _greedy(b, w, 3, 6)
    gains = dict(zip(result.order.tolist(), result.gains.tolist(), strict=True))
    assert torch.isfinite(result.gains).all()
    assert gains[1] == 0.0
    assert min(gains[0], gains[4]) == 0.0  # whichever came second adds nothing
    assert result.order.tolist()[-2:] in ([1, 4], [4, 1], [1, 0], [0, 1])
    new_w = refit(b.T @ b, w, torch.arange(6), 3)
    assert torch.isfinite(new_w).all()
    assert float(new_w[3:6].abs().max()) == 0.0  # minimum-norm: dead columns get no weight


def test_stochastic_greedy_is_seeded_and_close():
    b, _, w = _site(rows=300, groups=30, group_size=1, outputs=6, seed=11)
    exact = _greedy(b, w, 1, 10)
    runs = [_greedy(b, w, 1, 10, epsilon=0.1, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert runs[0].order.tolist() == runs[1].order.tolist()
    assert runs[0].order.tolist() != runs[2].order.tolist()
    for r in runs:  # guarantee in expectation: (1 - 1/e - epsilon) of greedy's optimum bound
        assert r.objective[-1] >= (1 - math.exp(-1) - 0.1) * exact.objective[-1]


def test_ridge_is_recorded_and_shrinks():
    b, _, w = _site(rows=100, groups=5, group_size=2, outputs=3, seed=13)
    g = b.T @ b
    result = _greedy(b, w, 2, 3, ridge=0.1)
    assert result.ridge == pytest.approx(0.1 * float(g.diagonal().mean()))
    keep = result.keep(3)
    plain, ridged = refit(g, w, keep, 2), refit(g, w, keep, 2, ridge=0.1)
    assert ridged.norm() < plain.norm()


def test_runs_on_tensor_device_and_rejects_bad_input():
    b, _, w = _site(rows=50, groups=4, group_size=2, outputs=3, seed=1)
    g = b.T @ b
    with pytest.raises(ValueError, match="k=5"):
        greedy_select(g, w, 1.0, 2, 5)
    with pytest.raises(ValueError, match="group_size"):
        greedy_select(g, w, 1.0, 3, 1)
    with pytest.raises(ValueError, match="NaN"):
        greedy_select(g * float("nan"), w, 1.0, 2, 1)
    with pytest.raises(ValueError, match="epsilon"):
        greedy_select(g, w, 1.0, 2, 1, epsilon=1.5)
    with pytest.raises(ValueError, match="ridge"):
        greedy_select(g, w, 1.0, 2, 1, ridge=-1)
    with pytest.raises(ValueError, match="weight"):
        greedy_select(g, w[:3], 1.0, 2, 1)
    if torch.cuda.is_available():  # the CUDA path gives the CPU answer
        cpu = greedy_select(g, w, 1.0, 2, 4)
        gpu = greedy_select(g.cuda(), w.cuda(), 1.0, 2, 4)
        assert gpu.order.tolist() == cpu.order.tolist()
