"""The greedy solver: reweighted column-subset selection in Gram form.

Pure tensor maths, no ``nn.Module``. One pruning site is described by its
second-moment statistics (see :mod:`subprune.statistics`):

* ``gram``  G = B^T B, shape (d, d): the consumer input of the model being pruned;
* ``cross`` C = B^T A, shape (d, d): against the target input A (``None`` means A = B);
* ``weight`` W, shape (d, m): the consumer weight, transposed and flattened;
* ``target_energy`` ||A W||_F^2: the consumer's pre-activation energy.

The d columns form n groups of ``group_size`` contiguous columns, one group per
producer channel. Source: El Halabi, Srinivas & Lacoste-Julien, *Data-Efficient
Structured Pruning via Submodular Optimization*, NeurIPS 2022, Sec. 3-4
(objective F(S) = ||Y||^2 - min_W' ||B_S W' - Y||^2, Eq. 3; greedy, Alg. 1).
The residual (group orthogonal matching pursuit) form is in docs/how-it-works.md, "Greedy in residual form".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Eigenvalues of a g x g residual block below RTOL * trace(original block) are
# treated as zero: that channel adds nothing new (dead ReLU, duplicate channel).
RTOL = 1e-10


@dataclass(frozen=True)
class GreedyResult:
    """The nested greedy selection of one site.

    Attributes
    ----------
    order : Tensor of shape (k,), int64
        Group (channel) indices in the order greedy chose them; ``order[:j]`` is
        the greedy set S_j for every j <= k.
    gains : Tensor of shape (k,), float64
        F(S_j) - F(S_{j-1}), in units of squared pre-activation.
    objective : Tensor of shape (k,), float64
        f(S_j) = F(S_j) / ||Y||_F^2 in [0, 1], the share of the consumer's
        pre-activation energy kept with the refit weights.
    target_energy : float
        ||Y||_F^2 = ||A W||_F^2.
    ridge : float
        The ridge actually added to the diagonal of G (absolute units).
    """

    order: Tensor
    gains: Tensor
    objective: Tensor
    target_energy: float
    ridge: float

    def keep(self, k: int) -> Tensor:
        """Sorted group indices of the greedy set S_k, shape (k,), int64."""
        if not 1 <= k <= self.order.numel():
            raise ValueError(f"k={k} is outside 1..{self.order.numel()} (the greedy run's length)")
        return torch.sort(self.order[:k]).values


def _check_site(gram: Tensor, cross: Tensor | None, weight: Tensor, group_size: int) -> int:
    """Validate shapes; return the number of groups n."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (d, d), got shape {tuple(gram.shape)}")
    d = gram.shape[0]
    if cross is not None and cross.shape != gram.shape:
        raise ValueError(f"cross must have the shape of gram {tuple(gram.shape)}, got {tuple(cross.shape)}")
    if weight.ndim != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (d, m) with d={d}, got shape {tuple(weight.shape)}")
    if group_size < 1 or d % group_size:
        raise ValueError(f"group_size={group_size} does not divide d={d}")
    return d // group_size


def ridge_value(gram: Tensor, ridge: float) -> float:
    """Absolute ridge lambda * mean(diag G) for a relative ``ridge`` >= 0."""
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    return float(ridge * gram.diagonal().mean()) if ridge > 0 else 0.0


def _block_diagonal(matrix: Tensor, n: int, g: int) -> Tensor:
    """The n diagonal g x g blocks of a (n g, n g) matrix, shape (n, g, g)."""
    blocks = matrix.reshape(n, g, n, g).diagonal(dim1=0, dim2=2)  # (g, g, n)
    return blocks.permute(2, 0, 1)


def _pinv_factor(blocks: Tensor, tol: Tensor) -> Tensor:
    """Factors L with L L^T = pinv of symmetric PSD blocks (..., g, g); eigenvalues <= tol (...,) dropped."""
    evals, evecs = torch.linalg.eigh(blocks)  # (..., g), (..., g, g)
    keep = evals > tol.unsqueeze(-1)
    inv_sqrt = torch.where(keep, torch.where(keep, evals, torch.ones_like(evals)).rsqrt(), 0.0)
    return evecs * inv_sqrt.unsqueeze(-2)


def _check_greedy(
    gram: Tensor, cross: Tensor | None, weight: Tensor, group_size: int, k: int, epsilon: float
) -> int:
    """Validate a greedy run's arguments; return the number of groups n."""
    n = _check_site(gram, cross, weight, group_size)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of groups n={n}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    for label, t in (("gram", gram), ("cross", cross), ("weight", weight)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{label} holds NaN or infinite values; check the calibration inputs")
    return n


def _dead_tolerance(block_trace: Tensor) -> Tensor:
    """Per-group eigenvalue threshold (n,): RTOL x the group's trace, plus an absolute floor for dead groups."""
    scale = float(block_trace.max()) if block_trace.numel() else 0.0
    return RTOL * block_trace + RTOL * 1e-3 * scale


def _sample_size(n: int, k: int, epsilon: float) -> int:
    """Candidates scored per step: all, or ceil((n / k) ln(1 / epsilon)) for stochastic greedy."""
    return n if epsilon == 0 else min(n, math.ceil(n / k * math.log(1.0 / epsilon)))


def greedy_select(
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
) -> GreedyResult:
    """Greedy maximisation of F(S) over groups, in residual (Gram) form.

    Each step picks the group c maximising tr(Hr_c^T R_cc^+ Hr_c), then deflates
    R = R - R[:, c] R_cc^+ R[c, :] and Hr = Hr - R[:, c] R_cc^+ Hr[c, :] (paper Sec. 4;
    docs/how-it-works.md, "Greedy in residual form"). The candidates' gains are computed in one batch of g x g
    eigendecompositions. Cost per step O(d^2 g + n g^3 + n g^2 m), independent of
    the number of samples. Runs in float64 on the device of ``gram``.

    Parameters
    ----------
    gram : Tensor of shape (d, d)
        G = B^T B, symmetric positive semi-definite.
    weight : Tensor of shape (d, m)
        Consumer weight W (transposed, flattened).
    target_energy : float
        ||Y||_F^2 = tr(W^T A^T A W), used to normalise the objective.
    group_size : int
        Columns per group g; d = n g.
    k : int
        Number of groups to select, 1 <= k <= n. The whole order S_1..S_k comes
        from one run, since greedy is nested.
    cross : Tensor of shape (d, d), optional
        C = B^T A for the asymmetric target (AsymInChange); ``None`` means C = G.
    epsilon : float, default 0
        Stochastic greedy (Mirzasoleiman et al., AAAI 2015): when > 0 each step
        scores a random subset of ceil((n / k) ln(1 / epsilon)) remaining groups.
    ridge : float, default 0
        Relative ridge: lambda * mean(diag G) is added to the diagonal of G.
    generator : torch.Generator, optional
        Source of randomness for stochastic greedy.

    Returns
    -------
    GreedyResult

    Raises
    ------
    ValueError
        On inconsistent shapes, k outside 1..n, epsilon outside [0, 1), a
        negative ridge, or non-finite statistics.

    Notes
    -----
    A group whose residual block is numerically zero (every eigenvalue below
    ``RTOL`` times the trace of its original block) has gain exactly 0, never NaN.
    F is gamma-weakly submodular, so greedy is within (1 - e^-gamma) of the best
    set of size k (paper, Prop. 1 and Thm. 1).
    """
    n = _check_greedy(gram, cross, weight, group_size, k, epsilon)
    g = group_size

    dtype, device = torch.float64, gram.device
    lam = ridge_value(gram, ridge)
    residual = gram.to(dtype).clone()  # R, (d, d)
    w = weight.to(device=device, dtype=dtype)
    h_res = (residual if cross is None else cross.to(dtype)) @ w  # Hr = C W, (d, m)
    if lam:
        residual.diagonal().add_(lam)  # the ridge regularises G, not the target
    m = w.shape[1]

    tol = _dead_tolerance(_block_diagonal(residual, n, g).diagonal(dim1=-2, dim2=-1).sum(-1))  # (n,)

    available = torch.ones(n, dtype=torch.bool, device=device)
    n_sample = _sample_size(n, k, epsilon)
    order = torch.empty(k, dtype=torch.long)
    gains = torch.empty(k, dtype=dtype)
    for step in range(k):
        candidates = available.nonzero().squeeze(1)  # (n - step,)
        if n_sample < candidates.numel():
            perm = torch.randperm(candidates.numel(), generator=generator)[:n_sample]
            candidates = candidates[perm.to(device)]
        r_blocks = _block_diagonal(residual, n, g)[candidates]  # (c, g, g)
        h_blocks = h_res.reshape(n, g, m)[candidates]  # (c, g, m)
        factor = _pinv_factor(r_blocks, tol[candidates])  # (c, g, g), L L^T = R_cc^+
        cand_gain = (factor.transpose(1, 2) @ h_blocks).square().sum(dim=(1, 2))  # (c,)
        best = int(torch.argmax(cand_gain))
        chosen = int(candidates[best])
        order[step], gains[step] = chosen, cand_gain[best]
        available[chosen] = False

        # R -= R[:, c] R_cc^+ R[c, :] and Hr -= R[:, c] R_cc^+ Hr[c, :], as rank-g updates u u^T, u v.
        cols = slice(chosen * g, (chosen + 1) * g)
        u = residual[:, cols] @ factor[best]  # (d, g)
        v = factor[best].T @ h_res[cols]  # (g, m)
        residual.addmm_(u, u.T, alpha=-1.0)
        h_res.addmm_(u, v, alpha=-1.0)

    energy = float(target_energy)
    objective = torch.cumsum(gains, 0) / energy if energy > 0 else torch.zeros_like(gains)
    return GreedyResult(order, gains.cpu(), objective.cpu(), energy, lam)


def refit(
    gram: Tensor,
    weight: Tensor,
    keep: Tensor,
    group_size: int,
    *,
    cross: Tensor | None = None,
    ridge: float = 0.0,
) -> Tensor:
    """Least-squares consumer weights on the kept groups: W'_S = G_SS^+ H_S.

    Parameters
    ----------
    gram : Tensor of shape (d, d)
    weight : Tensor of shape (d, m)
    keep : Tensor of shape (k,), int64
        Sorted indices of the kept groups.
    group_size : int
    cross : Tensor of shape (d, d), optional
        C = B^T A; ``None`` means the symmetric target C = G.
    ridge : float, default 0
        Relative ridge, as in :func:`greedy_select`.

    Returns
    -------
    Tensor of shape (k * group_size, m), float64
        The reweighted consumer weight on the kept columns, in the order of ``keep``.
        For a singular G_SS it is the minimum-norm solution (dead columns get 0).

    Raises
    ------
    ValueError
        On inconsistent shapes or a keep index out of range.
    """
    n = _check_site(gram, cross, weight, group_size)
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= n:
        raise ValueError(f"keep must hold group indices in 0..{n - 1}, got {keep.tolist()}")
    cols = group_columns(keep.to(gram.device), group_size)  # (k g,)
    g64 = gram.to(torch.float64)
    h = (g64 if cross is None else cross.to(torch.float64))[cols] @ weight.to(g64)  # (k g, m)
    return solve_normal_equations(g64[cols][:, cols], h, ridge_value(gram, ridge))


def solve_normal_equations(g_ss: Tensor, h: Tensor, lam: float = 0.0) -> Tensor:
    """W = (G_SS + lam I)^+ H_S for a PSD G_SS (d, d) and H_S (d, m): the least-squares refit.

    Columns whose diagonal entry is numerically zero (dead inputs) get weight
    exactly 0; the pseudo-inverse drops eigenvalues below ``RTOL`` times the
    largest diagonal entry. Returns a Tensor of shape (d, m), float64.
    """
    g_ss, h = g_ss.to(torch.float64), h.to(torch.float64)
    if lam:
        g_ss = g_ss + lam * torch.eye(g_ss.shape[0], dtype=g_ss.dtype, device=g_ss.device)
    diag = g_ss.diagonal()
    live = diag > RTOL * float(diag.max())  # dead columns (zero input) get weight exactly 0
    solution = torch.zeros_like(h)
    if live.any():
        g_live = g_ss[live][:, live]
        atol = RTOL * float(g_live.diagonal().max())
        solution[live] = torch.linalg.pinv(g_live, hermitian=True, atol=atol) @ h[live]
    return solution


def weights_objective(
    gram: Tensor,
    weight: Tensor,
    target_energy: float,
    keep: Tensor,
    new_weight: Tensor,
    group_size: int,
    *,
    cross: Tensor | None = None,
) -> float:
    """f = 1 - ||B_S W'_S - A W||^2 / ||A W||^2 for any consumer weight W'_S.

    Measures the kept share of pre-activation energy for weights that were not
    refit (the no-reweighting variants), from the same statistics.

    Parameters
    ----------
    gram, weight, target_energy, group_size, cross
        As in :func:`greedy_select`.
    keep : Tensor of shape (k,)
        Sorted kept groups.
    new_weight : Tensor of shape (k * group_size, m)
        The consumer weight written on the kept columns.

    Returns
    -------
    float
        f in (-inf, 1]; 1 means the consumer input is reproduced exactly.
    """
    _check_site(gram, cross, weight, group_size)
    cols = group_columns(keep.to(gram.device), group_size)
    g64 = gram.to(torch.float64)
    w_new = new_weight.to(g64)
    h = (g64 if cross is None else cross.to(torch.float64))[cols] @ weight.to(g64)  # (k g, m)
    kept = 2.0 * (w_new * h).sum() - (w_new * (g64[cols][:, cols] @ w_new)).sum()
    return float(kept / target_energy) if target_energy > 0 else 0.0


def group_columns(keep: Tensor, group_size: int) -> Tensor:
    """Column indices of the groups ``keep`` (k,): shape (k * group_size,), group-major."""
    offsets = torch.arange(group_size, device=keep.device)
    return (keep.unsqueeze(1) * group_size + offsets).reshape(-1)


def stack_problems(
    grams: list[Tensor],
    weights: list[Tensor],
    group_sizes: list[int],
    crosses: list[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """One site problem whose objective is the sum of several consumers' objectives.

    A site whose channels reach several consumers j keeps the same groups S in
    all of them, and its objective is sum_j F_j(S). Stacking the consumers' rows
    of B block-diagonally (each consumer's rows see only its own columns) and
    their weights block-diagonally gives exactly that sum: the stacked G (and C)
    is block-diagonal, the least-squares W' is block-diagonal, and
    F(S) = sum_j tr(H_jS^T G_jSS^+ H_jS). Columns are reordered group-major, so
    group c is columns c*g .. c*g+g-1 with g = sum_j g_j, and
    :func:`greedy_select` applies unchanged.

    Parameters
    ----------
    grams : list of Tensor of shape (n * g_j, n * g_j)
    weights : list of Tensor of shape (n * g_j, m_j)
    group_sizes : list of int
        g_j, columns per group in consumer j.
    crosses : list of Tensor of shape (n * g_j, n * g_j) or None, optional
        C_j = B_j^T A_j; ``None`` entries mean C_j = G_j. If all are ``None``
        (or the list is omitted) the stacked cross is ``None``.

    Returns
    -------
    gram : Tensor of shape (n * g, n * g), float64
    weight : Tensor of shape (n * g, sum_j m_j), float64
    cross : Tensor of shape (n * g, n * g), float64, or None
    group_size : int
        g = sum_j g_j.

    Raises
    ------
    ValueError
        If the lists differ in length or the consumers disagree on n.
    """
    crosses = crosses if crosses is not None else [None] * len(grams)
    if not grams or not len(grams) == len(weights) == len(group_sizes) == len(crosses):
        raise ValueError("grams, weights, group_sizes and crosses must be non-empty lists of equal length")
    n = _check_site(grams[0], crosses[0], weights[0], group_sizes[0])
    for gram, cross, weight, g in zip(grams, crosses, weights, group_sizes, strict=True):
        if _check_site(gram, cross, weight, g) != n:
            raise ValueError("every consumer of a site must hold the same number of groups n")
    g_total, m_total = sum(group_sizes), sum(w.shape[1] for w in weights)
    device, dtype = grams[0].device, torch.float64
    stacked_gram = torch.zeros(n * g_total, n * g_total, dtype=dtype, device=device)
    stacked_weight = torch.zeros(n * g_total, m_total, dtype=dtype, device=device)
    asymmetric = any(c is not None for c in crosses)
    stacked_cross = torch.zeros_like(stacked_gram) if asymmetric else None
    col, row = 0, 0
    groups = torch.arange(n, device=device).unsqueeze(1) * g_total  # (n, 1)
    for gram, cross, weight, g in zip(grams, crosses, weights, group_sizes, strict=True):
        idx = (groups + col + torch.arange(g, device=device)).reshape(-1)  # (n g_j,) stacked positions
        stacked_gram[idx.unsqueeze(1), idx] = gram.to(dtype)
        stacked_weight[idx, row : row + weight.shape[1]] = weight.to(device=device, dtype=dtype)
        if stacked_cross is not None:
            stacked_cross[idx.unsqueeze(1), idx] = (gram if cross is None else cross).to(dtype)
        col, row = col + g, row + weight.shape[1]
    return stacked_gram, stacked_weight, stacked_cross, g_total
