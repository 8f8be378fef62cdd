"""Selection methods: one registry, each a small selection function.

A method says where a site's statistics come from (``sequential``: from the
model with earlier sites already pruned; ``asymmetric``: the target is the
dense model's consumer input) and how channels are chosen (``select``). The
pipeline in :mod:`subprune.pipeline` is shared by all of them. Source: El Halabi
et al., NeurIPS 2022, Sec. 4 (LayerInChange, SeqInChange, AsymInChange).

The baselines (Sec. 5 of the paper; scores in :mod:`subprune.baselines`) score
every channel once on the dense model (``score``) and keep the top-scoring ones
(or sample them, LayerSampling). "Layer" baselines keep the per-site budget;
the others (``global_ranking``) rank channels of all sites together, and the
pipeline turns that ranking into the per-site budget before selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from subprune.baselines import (
    ScoreFn,
    act_grad_scores,
    greedy_fs_full_scores,
    greedy_fs_scores,
    random_scores,
    sensitivity_scores,
    weight_norm_scores,
)
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
    scores : Tensor of shape (channels,), float64, or None
        Channel scores of the method's ``score`` function (baselines only).
    parts : Tensor of shape (channels,), int64, or None
        A partition of the channels of which every part keeps the same number
        (query heads of a key/value group); ``None``: no constraint.
    """

    gram: Tensor
    cross: Tensor | None
    weight: Tensor
    target_energy: float
    group_size: int
    channels: int
    scores: Tensor | None = None
    parts: Tensor | None = None


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
        cross=problem.cross, epsilon=epsilon, ridge=ridge, generator=generator, parts=problem.parts,
    )
    return Selection(result.keep(k), result.order, result.objective)


def _scores(problem: SiteProblem) -> Tensor:
    if problem.scores is None or problem.scores.shape != (problem.channels,):
        raise ValueError(f"this selection needs one score per channel ({problem.channels}), "
                         f"got {None if problem.scores is None else tuple(problem.scores.shape)}")
    return problem.scores


def ranked_selection(
    problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator
) -> Selection:
    """Keep the k channels with the highest ``problem.scores`` (ties: the lower index first)."""
    order = torch.sort(_scores(problem), descending=True, stable=True).indices[:k]  # (k,)
    return Selection(torch.sort(order).values, order, None)


def sampled_selection(
    problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator
) -> Selection:
    """Sample k distinct channels with probability proportional to ``problem.scores``.

    Successive sampling without replacement, which has the same distribution as
    sampling with replacement until k distinct channels are drawn (the sampling of
    Liebenwein et al., ICLR 2020, with the count of distinct channels fixed to the
    site's budget). Channels of zero score get a tiny probability so that k
    distinct channels always exist.
    """
    scores = _scores(problem).double().clamp_min(0.0)  # (n,)
    top = float(scores.max())
    probs = scores + (1e-12 * top if top > 0 else 1.0)  # (n,)
    order = torch.multinomial(probs, k, replacement=False, generator=generator)  # (k,)
    return Selection(torch.sort(order).values, order, None)


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    Attributes
    ----------
    name : str
    select : SelectFn
    sequential, asymmetric : bool
        Where the statistics of the refit come from (see the module docstring).
    description : str
    score : ScoreFn or None
        Channel scores computed once on the dense model, handed to ``select`` as
        ``SiteProblem.scores``.
    global_ranking : bool
        Rank channels across all sites (scores divided by their site's maximum)
        instead of using the per-site budget.
    needs_labels : bool
        The method needs the calibration labels and a loss.
    needs_score_data : bool
        The method's score evaluates the loss on a separate, larger labelled set
        (``prune(score_data=...)``; the training split in the CLI and benchmarks).
    """

    name: str
    select: SelectFn
    sequential: bool
    asymmetric: bool
    description: str
    score: ScoreFn | None = None
    global_ranking: bool = False
    needs_labels: bool = False
    needs_score_data: bool = False


METHODS: dict[str, Method] = {
    "layer": Method("LayerInChange", greedy_selection, sequential=False, asymmetric=False,
                    description="every site independently, statistics of the dense model"),
    "seq": Method("SeqInChange", greedy_selection, sequential=True, asymmetric=False,
                  description="sites in forward order, statistics of the partly pruned model"),
    "asym": Method("AsymInChange", greedy_selection, sequential=True, asymmetric=True,
                   description="as seq, with the dense model's consumer input as target"),
    "random": Method("Random", ranked_selection, sequential=False, asymmetric=False,
                     description="uniformly random channels, ranked globally", score=random_scores,
                     global_ranking=True),
    "layer-random": Method("LayerRandom", ranked_selection, sequential=False, asymmetric=False,
                           description="uniformly random channels per site", score=random_scores),
    "weightnorm": Method("WeightNorm", ranked_selection, sequential=False, asymmetric=False,
                         description="L1 norm of outgoing weights, ranked globally", score=weight_norm_scores,
                         global_ranking=True),
    "layer-weightnorm": Method("LayerWeightNorm", ranked_selection, sequential=False, asymmetric=False,
                               description="L1 norm of outgoing weights per site", score=weight_norm_scores),
    "actgrad": Method("ActGrad", ranked_selection, sequential=False, asymmetric=False,
                      description="|activation x gradient| (uses labels), ranked globally",
                      score=act_grad_scores, global_ranking=True, needs_labels=True),
    "layer-actgrad": Method("LayerActGrad", ranked_selection, sequential=False, asymmetric=False,
                            description="|activation x gradient| (uses labels) per site",
                            score=act_grad_scores, needs_labels=True),
    "layer-sampling": Method("LayerSampling", sampled_selection, sequential=False, asymmetric=False,
                             description="channels sampled by sensitivity per site", score=sensitivity_scores),
    "layer-greedyfs": Method("LayerGreedyFS", ranked_selection, sequential=False, asymmetric=False,
                             description="greedy forward selection by mini-batch loss (uses labels) per site",
                             score=greedy_fs_scores, needs_labels=True),
    "layer-greedyfs-full": Method("LayerGreedyFS-full", ranked_selection, sequential=False, asymmetric=False,
                                  description="greedy forward selection, a fresh mini-batch of the whole training "
                                              "split per step (uses labels) per site",
                                  score=greedy_fs_full_scores, needs_labels=True, needs_score_data=True),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]
