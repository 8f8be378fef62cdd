"""Selection methods: one registry, each a small selection function.

A method says where a site's statistics come from (``sequential``: from the
model with earlier sites already pruned; ``asymmetric``: the target is the
dense model's consumer input) and how channels are chosen (``select``). The
pipeline in :mod:`subprune.pipeline` is shared by all of them. Source: El Halabi
et al., NeurIPS 2022, Sec. 4 (LayerInChange, SeqInChange, AsymInChange).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from subprune.solver import GreedyResult
from subprune.solver_factored import greedy_select_factored


@dataclass(frozen=True)
class SiteProblem:
    """What a selection function sees of one site (no nn.Module).

    Attributes
    ----------
    gram : Tensor of shape (d, d)
    cross : Tensor of shape (d, d) or None
    weight : Tensor of shape (d, m)
    target_energy : float
    group_size : int
    channels : int
    """

    gram: Tensor
    cross: Tensor | None
    weight: Tensor
    target_energy: float
    group_size: int
    channels: int


@dataclass(frozen=True)
class Selection:
    """The channels one selection function keeps.

    Attributes
    ----------
    keep : Tensor of shape (k,), int64, sorted
    order : Tensor of shape (k,), int64
        Order in which the channels were chosen (or ranked).
    objective : Tensor of shape (k,), float64, or None
        f(S_1..S_k) with refit weights, where the method computes it.
    """

    keep: Tensor
    order: Tensor
    objective: Tensor | None


SelectFn = Callable[[SiteProblem, int, float, float, torch.Generator], Selection]


def greedy_selection(
    problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator
) -> Selection:
    """Greedy (or stochastic greedy) maximisation of F(S).

    Runs :func:`subprune.solver_factored.greedy_select_factored`: the choices of
    :func:`subprune.solver.greedy_select` without its d x d residual copy, and
    cheaper per step (O(d (j + m) g) instead of O(d^2 g)).
    """
    result: GreedyResult = greedy_select_factored(
        problem.gram, problem.weight, problem.target_energy, problem.group_size, k,
        cross=problem.cross, epsilon=epsilon, ridge=ridge, generator=generator,
    )
    return Selection(result.keep(k), result.order, result.objective)


@dataclass(frozen=True)
class Method:
    """A registered pruning method."""

    name: str
    select: SelectFn
    sequential: bool
    asymmetric: bool
    description: str


METHODS: dict[str, Method] = {
    "layer": Method("LayerInChange", greedy_selection, sequential=False, asymmetric=False,
                    description="every site independently, statistics of the dense model"),
    "seq": Method("SeqInChange", greedy_selection, sequential=True, asymmetric=False,
                  description="sites in forward order, statistics of the partly pruned model"),
    "asym": Method("AsymInChange", greedy_selection, sequential=True, asymmetric=True,
                   description="as seq, with the dense model's consumer input as target"),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]
