"""Baseline selection functions that transformer users know, on the shared pipeline.

Each scores every group (producer channel) from the same site statistics the
greedy uses and keeps the k best; the pipeline then refits or not, exactly as
for the paper's methods, so "with / without refit" is one switch.

* ``magnitude``: ||W_c||_F, the Frobenius norm of the consumer columns of group c.
* ``wanda``: sum over the group's columns j and consumer outputs i of
  |W_ji| * ||X_j||_2 (Wanda, Sun et al., ICLR 2024, Eq. 1, summed over the
  structure as in its structured variant; ||X_j||_2 = sqrt(G_jj)).
* ``flap``: FLAP's fluctuation metric sum_j Var(X_j) * ||W_j||^2 (An et al.,
  AAAI 2024, Eq. 5, "WIFV"), with bias compensation b' = b + mean(X_pruned) W_pruned
  when the consumer is not refit (Eq. 7). Needs column means: :class:`MomentProblem`.

W is the consumer weight (d, m), X the consumer input (rows, d), G = X^T X.
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


def _top_k(scores: Tensor, k: int) -> Selection:
    """Keep the k highest scores (ties: lower index first); order = by decreasing score."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices[:k].cpu()
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


def flap_scores(problem: SiteProblem) -> Tensor:
    """sum_{j in c} Var(X_j) * ||W_j||^2 per group c, shape (n,); ValueError without moments."""
    if not isinstance(problem, MomentProblem) or problem.mean is None or problem.rows < 2:
        raise ValueError("the flap baseline needs column means and a row count: pass a MomentProblem")
    mean = problem.mean.to(torch.float64)
    variance = (problem.gram.diagonal() - problem.rows * mean.square()).clamp_min(0) / (problem.rows - 1)
    return _group_sum(variance * problem.weight.to(mean).square().sum(1), problem.group_size)


def _selector(score_fn):
    def select(problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator) -> Selection:
        if not 1 <= k <= problem.channels:
            raise ValueError(f"k={k} must be between 1 and the number of groups n={problem.channels}")
        return _top_k(score_fn(problem), k)

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
                    description="|W| * ||X|| summed over the group (Wanda, structured)"),
    "flap": Method("FLAP", _selector(flap_scores), sequential=True, asymmetric=False,
                   description="fluctuation Var(X) * ||W||^2 with bias compensation (FLAP)"),
}
BIAS_COMPENSATED = frozenset({"flap"})
