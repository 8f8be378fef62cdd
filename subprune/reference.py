"""Slow reference solvers, for tests and benchmarks only.

:func:`naive_greedy` is greedy selection as the paper's own code runs it: for every
candidate at every step, re-solve the least-squares refit on the stored input
matrix B. :func:`brute_force` tries every subset. Both work on B itself, so they
check the Gram-form solver of :mod:`subprune.solver` from first principles.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from subprune.solver import group_columns


def kept_energy(b: Tensor, target: Tensor, groups: list[int], group_size: int) -> float:
    """F(S) = ||Y||^2 - min_W' ||B_S W' - Y||^2 by a direct least-squares solve.

    Parameters
    ----------
    b : Tensor of shape (M, d)
        Consumer input of the model being pruned.
    target : Tensor of shape (M, m)
        Y = A W.
    groups : list of int
        The set S.
    group_size : int

    Returns
    -------
    float
    """
    energy = float((target**2).sum())
    if not groups:
        return 0.0
    cols = group_columns(torch.tensor(sorted(groups)), group_size)
    b_s = b[:, cols]  # (M, |S| g)
    solution = torch.linalg.lstsq(b_s, target, driver="gelsd").solution  # (|S| g, m)
    return energy - float(((b_s @ solution - target) ** 2).sum())


def naive_greedy(
    b: Tensor, weight: Tensor, group_size: int, k: int, a: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Greedy selection that re-solves least squares for every candidate.

    Parameters
    ----------
    b : Tensor of shape (M, d)
    weight : Tensor of shape (d, m)
    group_size : int
    k : int
    a : Tensor of shape (M, d), optional
        Target input (AsymInChange); ``None`` means A = B.

    Returns
    -------
    order : Tensor of shape (k,), int64
    objective : Tensor of shape (k,), float64
        f(S_1), ..., f(S_k).
    """
    b = b.to(torch.float64)
    target = (b if a is None else a.to(torch.float64)) @ weight.to(torch.float64)  # (M, m)
    energy = float((target**2).sum())
    n = b.shape[1] // group_size
    chosen: list[int] = []
    values: list[float] = []
    for _ in range(k):
        best, best_value = -1, -float("inf")
        for c in range(n):
            if c in chosen:
                continue
            value = kept_energy(b, target, chosen + [c], group_size)
            if value > best_value:
                best, best_value = c, value
        chosen.append(best)
        values.append(best_value / energy)
    return torch.tensor(chosen), torch.tensor(values, dtype=torch.float64)


def brute_force(
    b: Tensor, weight: Tensor, group_size: int, k: int, a: Tensor | None = None
) -> tuple[tuple[int, ...], float]:
    """The best set of k groups by exhaustive search, and its f(S)."""
    b = b.to(torch.float64)
    target = (b if a is None else a.to(torch.float64)) @ weight.to(torch.float64)
    energy = float((target**2).sum())
    n = b.shape[1] // group_size
    best = max(
        itertools.combinations(range(n), k),
        key=lambda s: kept_energy(b, target, list(s), group_size),
    )
    return best, kept_energy(b, target, list(best), group_size) / energy
