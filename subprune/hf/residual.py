"""The residual-stream target of AsymInChange: a consumer also absorbs the upstream residual error.

In a pre-norm block the sublayer output is added to the residual stream:
r_next = r + B W. AsymInChange (El Halabi et al., NeurIPS 2022, Sec. 3) fits
the pruned consumer's output B_S W' to the dense sublayer's output A W. After
that fit the pruned stream is r_p + B_S W' and the dense one r_d + A W, so the
error E = r_d - r_p that the pruned blocks before this one left in the stream
stays. The residual target is Y = A W + E: the consumer is asked to reproduce
the dense block's contribution plus the upstream error, as far as its kept
inputs can reach it (an extension of the paper's objective, measured in
docs/llm-methods.md).

The solver reads the cross statistics only as C W (:mod:`subprune.solver`), so
greedy and refit run unchanged on C' = C + (B^T E) W^+ with
||Y||^2 = ||A W||^2 + 2 <A^T E, W> + ||E||^2: C' W = B^T A W + B^T E when
W (d, m) has full column rank (W^+ W = I_m).
"""

from __future__ import annotations

import torch
from torch import Tensor

from subprune.statistics import GramStatistics


class ResidualStatistics(GramStatistics):
    """Gram statistics (asymmetric, with column sums) plus the sums of the upstream residual error E.

    Attributes
    ----------
    residual_b_ : Tensor of shape (d, m), float64, or None
        B^T E (None until a residual is added).
    residual_a_ : Tensor of shape (d, m), float64, or None
        A^T E.
    residual_energy_ : float
        ||E||_F^2.
    """

    def __init__(self, dim: int, device="cpu", name: str = "consumer"):
        super().__init__(dim, True, device, name, sums=True)
        self.residual_b_: Tensor | None = None
        self.residual_a_: Tensor | None = None
        self.residual_energy_ = 0.0

    def update(self, b: Tensor, a: Tensor | None = None, residual: Tensor | None = None) -> None:
        """Add rows of B (rows, d), A (rows, d) and, optionally, E (rows, m) = r_dense - r_pruned.

        Raises
        ------
        ValueError
            As :meth:`GramStatistics.update`, or if ``residual`` has another number of rows.
        """
        super().update(b, a)
        if residual is None:
            return
        if residual.ndim != 2 or residual.shape[0] != b.shape[0]:
            raise ValueError(f"{self.name}: residual rows {tuple(residual.shape)} do not match the inputs "
                             f"{tuple(b.shape)}")
        e = residual.to(self.cross_)  # (float64, on the statistics device; reading gram_ would fill its lower triangle)
        if self.residual_b_ is None:
            self.residual_b_ = torch.zeros(self.dim, e.shape[1], dtype=e.dtype, device=e.device)
            self.residual_a_ = torch.zeros_like(self.residual_b_)
        self.residual_b_ += b.to(e).T @ e
        self.residual_a_ += a.to(e).T @ e
        self.residual_energy_ += float(e.square().sum())


def residual_target(stats: ResidualStatistics, weight: Tensor) -> tuple[Tensor, float]:
    """(C', ||A W + E||^2): the cross statistics and target energy of the residual target Y = A W + E.

    Parameters
    ----------
    stats : ResidualStatistics
        A site's statistics with the upstream residual error accumulated.
    weight : Tensor of shape (d, m)
        The dense consumer weight W.

    Returns
    -------
    cross : Tensor of shape (d, d), float64
        C + (B^T E) W^+, so that cross @ W = B^T (A W + E).
    target_energy : float

    Raises
    ------
    ValueError
        If no residual error was accumulated, or W has not full column rank.
    """
    if getattr(stats, "residual_b_", None) is None:
        raise ValueError(f"{stats.name}: no residual-stream error was collected; the residual target needs the "
                         "block engine's AsymInChange run with residual=True")
    w = weight.to(stats.residual_b_)
    pinv = torch.linalg.pinv(w)  # (m, d)
    if float((pinv @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)).abs().max()) > 1e-6:
        raise ValueError(f"{stats.name}: the consumer weight {tuple(w.shape)} has not full column rank, so the "
                         "residual target cannot be written through C W; use the default sublayer target")
    energy = stats.target_energy(w) + 2 * float((w * stats.residual_a_).sum()) + stats.residual_energy_
    return stats.cross_ + stats.residual_b_ @ pinv, energy
