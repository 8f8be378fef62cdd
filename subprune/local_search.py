"""Swap local search after greedy, on the same Gram statistics (OSSCAR-style).

Greedy builds S one group at a time and never takes a choice back. A swap
replaces a kept group c by a dropped group j when that raises F(S): with
M = (G_SS + lambda I)^-1 and the refit W*_S = M H_S (H = C W), removing c costs
exactly ``delta_c = tr(W*_c^T (M_cc)^-1 W*_c)`` and adding j to S - c gains
exactly ``gain_j = tr(R_j^T S_j^-1 R_j)``, R_j = H_j - G_jS' W*_S',
S_j = G_jj + lambda I - G_jS' M' G_S'j (the Schur complement), so a swap is taken
iff ``gain_j > delta_c`` and F rises by their difference. Each round tries the
few cheapest groups to remove and the best group to add; it stops when no swap
helps or after ``max_swaps`` swaps. Pure tensor maths, float64.

Source: the swap-based local combinatorial search of OSSCAR (Meng, Behdin, Wang
& Mazumder, "OSSCAR: One-Shot Structured Pruning in Vision and Language Models
with Combinatorial Optimization", ICML 2024, Sec. 4), here on the objective
F(S) of El Halabi et al. (NeurIPS 2022, Eq. 3) and started from its greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from subprune.solver import group_columns, ridge_value


def _objective(gram: Tensor, h: Tensor, cols: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(M, W*) for the kept columns: M = (G_SS + lam I)^-1, shape (c, c); W* = M H_S, shape (c, m)."""
    g_ss = gram[cols][:, cols]
    g_ss = g_ss + lam * torch.eye(cols.numel(), dtype=g_ss.dtype, device=g_ss.device)
    m = torch.linalg.pinv(g_ss, hermitian=True)
    return m, m @ h[cols]


def swap_search(
    gram: Tensor,
    weight: Tensor,
    target_energy: float,
    group_size: int,
    keep: Tensor,
    *,
    cross: Tensor | None = None,
    ridge: float = 0.0,
    parts: Tensor | None = None,
    max_swaps: int = 32,
    tries: int = 4,
) -> tuple[Tensor, float, int]:
    """Improve a kept set by single swaps of groups while F(S) rises.

    Parameters
    ----------
    gram : Tensor of shape (d, d)
        G = B^T B.
    weight : Tensor of shape (d, m)
    target_energy : float
        ||A W||^2, to report f = F / ||A W||^2.
    group_size : int
    keep : Tensor of shape (k,), int64
        The starting set (greedy's).
    cross : Tensor of shape (d, d), optional
        C = B^T A (asymmetric target); ``None`` means C = G.
    ridge : float
        Relative ridge, as in :func:`subprune.solver.greedy_select`.
    parts : Tensor of shape (n,), optional
        A partition whose part counts must not change (a swap stays inside a part).
    max_swaps : int
        At most this many swaps.
    tries : int
        Kept groups (the cheapest to remove) tried per round.

    Returns
    -------
    keep : Tensor of shape (k,), int64, sorted
    objective : float
        f(S) with the refit weights after the swaps.
    swaps : int
        Swaps made.
    """
    g64 = gram.to(torch.float64)
    d = g64.shape[0]
    n, g = d // group_size, group_size
    lam = ridge_value(g64, ridge)
    h = (g64 if cross is None else cross.to(torch.float64)) @ weight.to(g64)  # H = C W, (d, m)
    kept = torch.sort(keep.cpu()).values
    swaps = 0
    for _ in range(max_swaps):
        cols = group_columns(kept.to(g64.device), g)
        m, w_star = _objective(g64, h, cols, lam)
        k = kept.numel()
        m_blocks = m.reshape(k, g, k, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (k, g, g)
        w_blocks = w_star.reshape(k, g, -1)  # (k, g, m)
        delta = (torch.linalg.solve(m_blocks, w_blocks) * w_blocks).sum((1, 2))  # removal cost, (k,)
        swapped = False
        for pos in torch.argsort(delta)[:tries].tolist():
            c = int(kept[pos])
            rest = torch.cat([kept[:pos], kept[pos + 1 :]])
            out = torch.ones(n, dtype=torch.bool)
            out[kept] = False
            if parts is not None:
                out &= parts.cpu() == parts.cpu()[c]
            out[c] = False
            candidates = out.nonzero().squeeze(1)
            if candidates.numel() == 0:
                continue
            rest_cols = group_columns(rest.to(g64.device), g)
            out_cols = group_columns(candidates.to(g64.device), g)
            schur = g64[out_cols][:, out_cols].reshape(-1, g, candidates.numel(), g).diagonal(dim1=0, dim2=2)
            schur = schur.permute(2, 0, 1) + lam * torch.eye(g, dtype=g64.dtype, device=g64.device)  # (o, g, g)
            g_or = g64[out_cols][:, rest_cols]  # (o g, (k-1) g)
            if rest.numel():
                m_rest, w_rest = _objective(g64, h, rest_cols, lam)
                q = g_or @ m_rest  # (o g, (k-1) g)
                schur = schur - q.reshape(-1, g, q.shape[1]) @ g_or.reshape(-1, g, q.shape[1]).transpose(1, 2)
            else:
                w_rest = torch.zeros(0, h.shape[1], dtype=g64.dtype, device=g64.device)
            r = (h[out_cols] - g_or @ w_rest).reshape(-1, g, h.shape[1])  # (o, g, m)
            eye = 1e-12 * schur.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-300)
            schur = schur + eye[:, None, None] * torch.eye(g, dtype=g64.dtype, device=g64.device)
            gain = (torch.linalg.solve(schur, r) * r).sum((1, 2))  # (o,)
            best = int(torch.argmax(gain))
            if float(gain[best]) > float(delta[pos]) * (1 + 1e-9) + 1e-12 * target_energy:
                kept = torch.sort(torch.cat([rest, candidates[best : best + 1]])).values
                swaps += 1
                swapped = True
                break
        if not swapped:
            break
    cols = group_columns(kept.to(g64.device), g)
    _, w_star = _objective(g64, h, cols, lam)
    objective = float((w_star * h[cols]).sum()) / target_energy if target_energy > 0 else 0.0
    return kept, objective, swaps
