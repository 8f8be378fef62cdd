"""Baseline selection functions that transformer users know, on the shared pipeline.

Each scores every group (producer channel) from the same site statistics the
greedy uses and keeps the k best; the pipeline then refits or not, exactly as
for the paper's methods, so "with / without refit" is one switch.

* ``magnitude``: ||W_c||_F, the Frobenius norm of the consumer columns of group c.
* ``wanda``: sum over the group's columns j and consumer outputs i of
  |W_ji| * ||X_j||_2 (Wanda, Sun et al., ICLR 2024, Eq. 1, summed over the
  structure as in its structured variant; ||X_j||_2 = sqrt(G_jj)); statistics of
  the partly pruned model, as Wanda's own code.
* ``wanda-sp``: the same score on the dense model's statistics with a uniform
  per-layer structure and no bias compensation: Wanda-sp as the FLAP paper runs
  it (An et al., AAAI 2024, Sec. 5.1; its code's ``WIFN`` metric
  ``mean_i |W_ij| sqrt(sum_t X_tj^2)``, which ranks as our sum).
* ``flap``: FLAP (An et al., AAAI 2024). Its fluctuation metric per consumer
  input column j is ``S_j = Var(X_j) * ||W_:,j||^2`` (Eq. 5, "WIFV"; the sample
  variance over calibration tokens). On the dense model's statistics (FLAP's
  code feeds every layer the dense layer's output). Attention columns enter
  squared and a head's score is the mean over its columns (the code's
  ``W_metric ** 2`` and ``reshape(-1, head_dim).mean``); an FFN neuron's score is
  its column's. The adaptive structure ("AL-AM": scores standardised per layer
  and module, then one global threshold weighted by the parameters a unit
  costs) is the ``flap`` budget (:func:`subprune.hf.budget.flap_plan`, from
  :func:`flap_standardised_scores`), the method's default. Without refit the
  consumer gets the bias compensation b' = b + mean(X_pruned) W_pruned (Eq. 7),
  a bias added when the consumer has none (LLaMA), as FLAP's ``compress``.

W is the consumer weight (d, m), X the consumer input (rows, d), G = X^T X.
What differs from FLAP's code: statistics in float64 over real tokens only
(the code averages float32 running moments over padded sequences of 128
tokens); a unit is what the architecture can remove (a key/value group with its
query heads on a GQA model, or a query head with ``--units qheads``); every
site keeps at least one unit (the code can empty a layer); the global
threshold keeps units while they fit the parameter target instead of the
code's nearest cumulative weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subprune.methods import Method, Selection, SiteProblem


@dataclass(frozen=True)
class MomentProblem(SiteProblem):
    """A :class:`SiteProblem` with first moments, for FLAP.

    Attributes
    ----------
    mean : Tensor of shape (d,), float64
        Column means of the consumer input B over the calibration rows.
    rows : int
        Number of rows M that G and ``mean`` summed.
    """

    mean: Tensor | None = None
    rows: int = 0


def _top_k(scores: Tensor, k: int, parts: Tensor | None = None) -> Selection:
    """Keep the k highest scores (ties: lower index first); order = by decreasing score.

    With ``parts`` (n,) every part keeps k / P of its highest-scoring channels.
    """
    ranked = torch.sort(-scores.to(torch.float64), stable=True).indices.cpu()
    if parts is None:
        order = ranked[:k]
    else:
        n_parts = int(parts.max()) + 1
        if k % n_parts:
            raise ValueError(f"k={k} must be a multiple of the {n_parts} parts")
        part_of = parts.cpu()[ranked]
        rank_in_part = torch.zeros_like(ranked)
        for p in range(n_parts):
            rank_in_part[part_of == p] = torch.arange(int((part_of == p).sum()))
        order = ranked[rank_in_part < k // n_parts]
    return Selection(torch.sort(order).values, order, None)


def _group_sum(per_column: Tensor, group_size: int) -> Tensor:
    """Sum a (d,) column score over groups of ``group_size`` contiguous columns: (d / g,)."""
    return per_column.reshape(-1, group_size).sum(1)


def magnitude_scores(problem: SiteProblem) -> Tensor:
    """||W_c||_F per group c, shape (n,)."""
    return _group_sum(problem.weight.to(torch.float64).square().sum(1), problem.group_size).sqrt()


def wanda_scores(problem: SiteProblem) -> Tensor:
    """sum_{j in c} ||X_j||_2 * sum_i |W_ji| per group c, shape (n,)."""
    norms = problem.gram.diagonal().clamp_min(0).sqrt()  # (d,)
    return _group_sum(norms * problem.weight.to(norms).abs().sum(1), problem.group_size)


def flap_column_metric(problem: SiteProblem) -> Tensor:
    """FLAP's fluctuation Var(X_j) * ||W_j||^2 per consumer input column j, shape (d,); ValueError without moments.

    Source: An et al., AAAI 2024, Eq. 5 (WIFV); Var is the sample variance over
    the calibration rows, from G_jj and the column mean.
    """
    if not isinstance(problem, MomentProblem) or problem.mean is None or problem.rows < 2:
        raise ValueError("the flap baseline needs column means and a row count: pass a MomentProblem")
    mean = problem.mean.to(torch.float64)
    variance = (problem.gram.diagonal() - problem.rows * mean.square()).clamp_min(0) / (problem.rows - 1)
    return variance * problem.weight.to(mean).square().sum(1)


def _flap_columns(problem: SiteProblem) -> Tensor:
    """The column metric as FLAP ranks it: squared for attention units (group_size > 1), shape (d,)."""
    metric = flap_column_metric(problem)
    return metric.square() if problem.group_size > 1 else metric


def flap_scores(problem: SiteProblem) -> Tensor:
    """FLAP's unit score, shape (n,): the mean over a unit's columns of the (attention: squared) fluctuation.

    An FFN neuron (group size 1) scores Var(X_j) ||W_j||^2; an attention unit
    the mean over its head_dim-wide columns of (Var(X_j) ||W_j||^2)^2, as in
    FLAP's code (``prune_flap``: ``W_metric ** 2`` for ``o_proj``).
    """
    return _flap_columns(problem).reshape(-1, problem.group_size).mean(1)


def flap_standardised_scores(problem: SiteProblem) -> Tensor:
    """FLAP's scores standardised within the site, shape (n,): comparable across layers and modules.

    z_j = (s_j - mean_j s) / std_j s over the site's columns (FLAP's
    ``standarlization``, per layer, per module), then the mean over each unit's
    columns. Ranking these across all sites gives FLAP's adaptive structure (AL-AM).
    """
    columns = _flap_columns(problem)
    z = (columns - columns.mean()) / columns.std().clamp_min(1e-30)
    return z.reshape(-1, problem.group_size).mean(1)


def _selector(score_fn):
    def select(problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator) -> Selection:
        if not 1 <= k <= problem.channels:
            raise ValueError(f"k={k} must be between 1 and the number of groups n={problem.channels}")
        return _top_k(score_fn(problem), k, problem.parts)

    select.__doc__ = f"Keep the k groups of highest {score_fn.__name__.removesuffix('_scores')} score."
    return select


def bias_compensation(problem: MomentProblem, keep: Tensor) -> Tensor:
    """FLAP's bias shift mean(X_pruned) @ W_pruned, shape (m,): add it to the consumer bias.

    The pruned columns are replaced by their calibration mean, so the consumer's
    output keeps its mean (An et al., AAAI 2024, Eq. 7).
    """
    d = problem.weight.shape[0]
    pruned = torch.ones(problem.channels, dtype=torch.bool)
    pruned[keep.cpu()] = False
    cols = pruned.repeat_interleave(problem.group_size)  # (d,)
    if cols.numel() != d:
        raise ValueError("keep does not match the problem's groups")
    cols = cols.to(problem.weight.device)
    return problem.mean.to(torch.float64)[cols] @ problem.weight.to(torch.float64)[cols]


# sequential: statistics (and the refit) come from the model with earlier sites pruned, as SeqInChange.
BASELINES: dict[str, Method] = {
    "magnitude": Method("Magnitude", _selector(magnitude_scores), sequential=True, asymmetric=False,
                        description="Frobenius norm of the consumer weight columns"),
    "wanda": Method("Wanda", _selector(wanda_scores), sequential=True, asymmetric=False,
                    description="|W| * ||X|| summed over the group (Wanda, structured), partly pruned model"),
    "wanda-sp": Method("Wanda-sp", _selector(wanda_scores), sequential=False, asymmetric=False,
                       description="|W| * ||X|| summed over the group, dense statistics (FLAP paper's Wanda-sp)"),
    "flap": Method("FLAP", _selector(flap_scores), sequential=False, asymmetric=False,
                   description="fluctuation Var(X) * ||W||^2, adaptive global structure, bias compensation (FLAP)"),
}
BIAS_COMPENSATED = frozenset({"flap"})
DEFAULT_BUDGETS = {"flap": "flap"}  # a method's own structure when the budget is "auto"
