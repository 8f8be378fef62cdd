"""The greedy solver with a factored residual, for large d: no d x d copy, O(d (j + m) g) a step.

:func:`subprune.solver.greedy_select` keeps the residual R = G - sum_j u_j u_j^T as a
dense d x d matrix and updates all of it every step: O(d^2 g) work and a second
d x d float64 array (2 GiB at d = 16,384). The same greedy needs only

* the diagonal g x g blocks of R and of P = Hr Hr^T, for the candidates' gains
  tr(L_c^T P_cc L_c) with L_c L_c^T = R_cc^+ (both n x g x g, updated by rank-g
  corrections, so the d x m matrix Hr is never rewritten);
* the columns R[:, c*] of the chosen group, rebuilt as G[:, c*] - U U[c*, :]^T,
  and the rows Hr[c*, :] = H[c*, :] - U[c*, :] V,

where H = C W (d x m), U = [u_1 ... u_j] (d x j g) and V = [v_1; ...; v_j]
(j g x m) stack the rank-g updates, Hr = H - U V. A step reads H once (for
Hr v^T) and U twice: O(d m g + d j g + n g^3), and memory is G (read only), H,
U and V. The choices are those of :func:`greedy_select` up to rounding; same
arguments, same :class:`~subprune.solver.GreedyResult`. Source: the residual form of
docs/how-it-works.md ("Greedy in residual form"), with the residual kept as a low-rank correction of G (the Cholesky
variant of orthogonal matching pursuit, Rubinstein et al., Technion CS-2008-08).
"""

from __future__ import annotations

import torch
from torch import Tensor

from subprune.solver import (
    GreedyResult,
    _block_diagonal,
    _check_greedy,
    _dead_tolerance,
    _pinv_factor,
    _sample_size,
    ridge_value,
)


def _part_quota(parts: Tensor | None, n: int, k: int) -> int:
    """Groups per part for a partition constraint (0 without one); ValueError on a bad partition."""
    if parts is None:
        return 0
    if parts.shape != (n,):
        raise ValueError(f"parts must have shape ({n},), got {tuple(parts.shape)}")
    n_parts = int(parts.max()) + 1
    if k % n_parts:
        raise ValueError(f"k={k} must be a multiple of the {n_parts} parts")
    return k // n_parts


def greedy_select_factored(
    gram: Tensor,
    weight: Tensor,
    target_energy: float,
    group_size: int,
    k: int,
    *,
    cross: Tensor | None = None,
    epsilon: float = 0.0,
    ridge: float = 0.0,
    generator: torch.Generator | None = None,
    parts: Tensor | None = None,
) -> GreedyResult:
    """Greedy maximisation of F(S) over groups, with the residual kept as G - U U^T.

    Parameters and return value are those of :func:`subprune.solver.greedy_select`
    (gram (d, d), weight (d, m), target_energy, group_size g, k, cross, epsilon,
    ridge, generator). ``gram`` is read, never copied or changed.

    parts : Tensor of shape (n,), int64, optional
        A partition of the groups into P parts (ids 0..P-1) of which every part
        keeps k / P groups (a partition-matroid constraint: query heads of a
        key/value group); greedy then picks the best group among the parts not
        yet full, and is within 1/(1 + 1/gamma) of the best such set (Fisher,
        Nemhauser & Wolsey 1978, for gamma = 1). k must be a multiple of P.

    Raises
    ------
    ValueError
        As :func:`subprune.solver.greedy_select`; or k not a multiple of the number of parts.
    """
    n = _check_greedy(gram, cross, weight, group_size, k, epsilon)
    quota = _part_quota(parts, n, k)
    g = group_size

    dtype, device = torch.float64, gram.device
    gram64 = gram.to(dtype)  # no copy when already float64
    d = gram64.shape[0]
    lam = ridge_value(gram64, ridge)
    w = weight.to(device=device, dtype=dtype)
    m = w.shape[1]
    h = (gram64 if cross is None else cross.to(dtype)) @ w  # H = C W, (d, m)
    h_groups = h.reshape(n, g, m)
    blocks = _block_diagonal(gram64, n, g).clone()  # diagonal blocks of R, (n, g, g)
    if lam:
        blocks.diagonal(dim1=-2, dim2=-1).add_(lam)
    h_blocks = h_groups @ h_groups.transpose(1, 2)  # diagonal blocks of P = Hr Hr^T, (n, g, g)
    updates = torch.empty(d, k * g, dtype=dtype, device=device)  # U, (d, k g)
    v_rows = torch.empty(k * g, m, dtype=dtype, device=device)  # V, (k g, m)

    tol = _dead_tolerance(blocks.diagonal(dim1=-2, dim2=-1).sum(-1))  # (n,), as in greedy_select

    available = torch.ones(n, dtype=torch.bool, device=device)
    n_sample = _sample_size(n, k, epsilon)
    order = torch.empty(k, dtype=torch.long)
    gains = torch.empty(k, dtype=dtype)
    for step in range(k):
        candidates = available.nonzero().squeeze(1)  # (n - step,)
        if n_sample < candidates.numel():
            perm = torch.randperm(candidates.numel(), generator=generator)[:n_sample]
            candidates = candidates[perm.to(device)]
        factor = _pinv_factor(blocks[candidates], tol[candidates])  # (c, g, g), L L^T = R_cc^+
        cand_gain = ((h_blocks[candidates] @ factor) * factor).sum(dim=(1, 2))  # tr(L^T P_cc L), (c,)
        best = int(torch.argmax(cand_gain))
        chosen = int(candidates[best])
        order[step], gains[step] = chosen, cand_gain[best]
        available[chosen] = False
        if quota:
            part = parts[chosen]
            if int((parts[order[: step + 1]] == part).sum()) == quota:
                available[parts.to(device) == part] = False

        j = step * g
        cols = slice(chosen * g, (chosen + 1) * g)
        past_u, past_v = updates[:, :j], v_rows[:j]  # (d, j g), (j g, m)
        r_cols = gram64[:, cols] - past_u @ past_u[cols].T  # R[:, c*], (d, g)
        if lam:
            r_cols[cols].diagonal().add_(lam)
        u = r_cols @ factor[best]  # (d, g)
        v = factor[best].T @ (h[cols] - past_u[cols] @ past_v)  # L^T Hr[c*, :], (g, m)
        q = h @ v.T - past_u @ (past_v @ v.T)  # Hr v^T, (d, g)
        updates[:, j : j + g], v_rows[j : j + g] = u, v
        # Hr <- Hr - u v: P_cc <- P_cc - u_c q_c^T - q_c u_c^T + u_c (v v^T) u_c^T; R_cc <- R_cc - u_c u_c^T.
        u_b, q_b = u.reshape(n, g, g), q.reshape(n, g, g)  # rows grouped by channel
        cross_term = u_b @ q_b.transpose(1, 2)
        h_blocks.sub_(cross_term + cross_term.transpose(1, 2)).add_(u_b @ (v @ v.T) @ u_b.transpose(1, 2))
        blocks.sub_(u_b @ u_b.transpose(1, 2))

    energy = float(target_energy)
    objective = torch.cumsum(gains, 0) / energy if energy > 0 else torch.zeros_like(gains)
    return GreedyResult(order, gains.cpu(), objective.cpu(), energy, lam)
