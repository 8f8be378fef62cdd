"""Per-site budgets: how many channels each pruning site keeps.

A target is a keep ratio of channels or a compression ratio of whole-network
parameters (dense / pruned; the paper uses 2, 4, 8, 16, 32, 64). Parameter
counts are computed from the module shapes, not by pruning
(:class:`ParameterCounter`). The budget across sites is uniform (one keep
ratio; for a compression target found by binary search), follows a global
ranking of channel scores (the global baselines), or comes from the objective
curves f(S_k) of every site (:func:`curve_plan`). Source: El Halabi et al.,
NeurIPS 2022, Sec. 5 and App. (per-layer budgets); DESIGN.md Sec. 6.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from subprune.sites import PruningSite
from subprune.surgery import get_module

# Bisection steps on the keep ratio: 2^-60 is far below 1 / (channels of any site).
BISECTION_STEPS = 60


def kept_channels(ratio: float, channels: int) -> int:
    """Channels kept at a keep ratio: round(ratio * channels), at least 1 and at most ``channels``."""
    return max(1, min(channels, round(ratio * channels)))


class ParameterCounter:
    """Whole-network parameter count as a function of the channels kept per site.

    Parameters
    ----------
    model : nn.Module
        The dense model the sites were found in (not modified).
    sites : list of PruningSite

    Notes
    -----
    A Linear/Conv2d weight of shape (out, in, ...) keeps out' * in' / (out * in)
    of its elements when out' of its output channels (it is a site's producer)
    and in' of its input channels (it is a site's consumer) are kept; its bias
    follows the output channels, a BatchNorm's affine parameters follow its
    site's channels. Every other parameter is unchanged.
    """

    def __init__(self, model: nn.Module, sites: list[PruningSite]) -> None:
        self.dense = sum(p.numel() for p in model.parameters())
        self._sites = {s.name: s for s in sites}
        roles: dict[str, list] = {}  # module -> [producer site, consumer site]
        for s in sites:  # every producer and consumer: several for a coupled residual site
            for producer in [r.module for r in s.producers] or [s.producer]:
                roles.setdefault(producer, [None, None])[0] = s.name
            for consumer in [r.module for r in s.consumers] or [s.consumer]:
                roles.setdefault(consumer, [None, None])[1] = s.name
        # (weight elements per kept (out, in) channel pair, bias per out channel, producer site, consumer site)
        self._modules: list[tuple[int, int, str | None, str | None]] = []
        fixed = self.dense
        for name, (out_site, in_site) in roles.items():
            module = get_module(model, name)
            n_out = self._sites[out_site].channels if out_site else 1
            n_in = self._sites[in_site].channels if in_site else 1
            bias = 0 if module.bias is None else module.bias.numel()
            self._modules.append((module.weight.numel() // (n_out * n_in), bias // n_out, out_site, in_site))
            fixed -= module.weight.numel() + bias
        self._batchnorms: list[tuple[int, str]] = []
        for s in sites:
            for bn in s.batchnorms:
                module = get_module(model, bn)
                per_channel = sum(p.numel() for p in module.parameters(recurse=False)) // s.channels
                self._batchnorms.append((per_channel, s.name))
                fixed -= per_channel * s.channels
        self._fixed = fixed

    def count(self, kept: Mapping[str, int]) -> int:
        """Parameters of the network when site ``name`` keeps ``kept[name]`` channels (others: all)."""
        def k(site: str | None) -> int:
            return 1 if site is None else kept.get(site, self._sites[site].channels)

        total = self._fixed
        for per_pair, bias, out_site, in_site in self._modules:
            total += per_pair * k(out_site) * k(in_site) + bias * k(out_site)
        for per_channel, site in self._batchnorms:
            total += per_channel * k(site)
        return total

    def budget(self, compression: float) -> float:
        """The parameter count that meets ``compression`` = dense / pruned."""
        return self.dense / compression


def _check_reachable(counter: ParameterCounter, sites: list[PruningSite], compression: float) -> None:
    smallest = counter.count({s.name: 1 for s in sites})
    if smallest > counter.budget(compression):
        raise ValueError(
            f"compression ratio {compression} cannot be reached by pruning these sites: keeping one channel "
            f"per site leaves {smallest} of {counter.dense} parameters (ratio {counter.dense / smallest:.1f}); "
            "ask for a smaller ratio or prune more layers"
        )


def keep_ratio_for_compression(counter: ParameterCounter, sites: list[PruningSite], compression: float) -> float:
    """The largest uniform keep ratio whose pruned network meets a compression ratio.

    Parameters
    ----------
    counter : ParameterCounter
    sites : list of PruningSite
        The sites pruned (each keeps :func:`kept_channels` (ratio, channels)).
    compression : float
        Target dense / pruned parameters, >= 1.

    Returns
    -------
    float
        Keep ratio r in (0, 1]; at r the parameter count is within the budget,
        and at any larger ratio it is not (bisection to 2^-60): the budget is met
        to within one channel step.

    Raises
    ------
    ValueError
        If even one channel per site exceeds the budget, or ``compression`` < 1.
    """
    if not compression >= 1 or not math.isfinite(compression):
        raise ValueError(f"compression ratio {compression} must be a finite number >= 1")
    _check_reachable(counter, sites, compression)
    budget = counter.budget(compression)

    def fits(ratio: float) -> bool:
        return counter.count({s.name: kept_channels(ratio, s.channels) for s in sites}) <= budget

    if fits(1.0):
        return 1.0
    low, high = 0.0, 1.0  # fits(low), not fits(high)
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return max(low, 0.25 / max(s.channels for s in sites))  # > 0; below 0.5 / channels every site keeps 1


def global_plan(
    sites: list[PruningSite],
    scores: Mapping[str, Tensor],
    total: int | None = None,
    counter: ParameterCounter | None = None,
    compression: float | None = None,
) -> dict[str, int]:
    """Channels kept per site from one ranking of the channels of all sites.

    Each site's scores are divided by the site's maximum (so that every site's
    best channel scores 1 and sites with scores of different scales compare);
    every site keeps its best channel, and the remaining channels are taken in
    decreasing normalised score (ties: earlier site, then lower index).

    Parameters
    ----------
    sites : list of PruningSite
    scores : mapping site name -> Tensor of shape (channels,)
    total : int, optional
        Total channels to keep (at least one per site).
    counter, compression : optional
        Instead of ``total``: keep as many ranked channels as fit in the
        parameter budget of the compression ratio.

    Returns
    -------
    dict site name -> channels kept

    Raises
    ------
    ValueError
        If neither or both of ``total`` and ``compression`` are given, or the
        compression ratio cannot be reached.
    """
    if (total is None) == (compression is None):
        raise ValueError("give exactly one of total and compression")
    kept = {s.name: 1 for s in sites}
    rest = []  # (-normalised score, site index, channel)
    for i, s in enumerate(sites):
        score = scores[s.name].double().cpu()
        top = float(score.max())
        normalised = score / top if top > 0 else torch.zeros_like(score)
        order = torch.sort(score, descending=True, stable=True).indices
        rest.extend((-float(normalised[c]), i, int(c)) for c in order[1:])
    rest.sort()

    def plan(extra: int) -> dict[str, int]:
        out = dict(kept)
        for _, i, _ in rest[:extra]:
            out[sites[i].name] += 1
        return out

    if total is not None:
        return plan(max(0, total - len(sites)))
    _check_reachable(counter, sites, compression)
    budget = counter.budget(compression)
    low, high = 0, len(rest)  # largest number of extra channels that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if counter.count(plan(mid)) <= budget else (low, mid - 1)
    return plan(low)


def curve_plan(
    sites: list[PruningSite],
    curves: Mapping[str, Tensor],
    total: int | None = None,
    counter: ParameterCounter | None = None,
    compression: float | None = None,
) -> dict[str, int]:
    """Channels kept per site by equalising the marginal gains of the objective curves.

    Every site starts with one channel; then one channel at a time goes to the
    site whose next channel adds the most kept energy share f(S_{k+1}) - f(S_k)
    (per parameter it costs, for a compression target), until the budget is
    spent. This minimises the summed relative loss sum_i (1 - f_i(S_{k_i})) when
    the curves have diminishing returns. The curves are unweighted: a site's
    energy ||A W||^2 has a layer-dependent scale that says little about its
    effect on accuracy, so relative losses are compared.

    Parameters
    ----------
    sites : list of PruningSite
    curves : mapping site name -> Tensor of shape (channels,)
        f(S_1..S_n) of each site, the greedy's whole nested run.
    total : int, optional
        Total channels to keep (>= one per site).
    counter, compression : optional
        Instead of ``total``: add channels while they fit in the parameter budget.

    Returns
    -------
    dict site name -> channels kept (sum = ``total`` for a channel target,
    clipped to the total number of channels)

    Raises
    ------
    ValueError
        If neither or both targets are given, a curve has the wrong length, or
        the compression ratio cannot be reached.
    """
    if (total is None) == (compression is None):
        raise ValueError("give exactly one of total and compression")
    for s in sites:
        if curves[s.name].shape != (s.channels,):
            raise ValueError(f"curve of site {s.name} must have shape ({s.channels},), "
                             f"got {tuple(curves[s.name].shape)}")
    kept = {s.name: 1 for s in sites}
    if compression is not None:
        _check_reachable(counter, sites, compression)
        budget = counter.budget(compression)
        used = counter.count(kept)
    open_sites = {s.name for s in sites if s.channels > 1}
    goal = sum(s.channels for s in sites) if total is None else min(total, sum(s.channels for s in sites))
    while open_sites and sum(kept.values()) < goal:
        best, best_value, best_cost = None, -math.inf, 0
        for s in sites:
            if s.name not in open_sites:
                continue
            k = kept[s.name]
            gain = float(curves[s.name][k] - curves[s.name][k - 1])
            cost = 1
            if compression is not None:
                cost = counter.count({**kept, s.name: k + 1}) - used
                if used + cost > budget:  # costs only grow as other sites grow: never fits again
                    open_sites.discard(s.name)
                    continue
            value = gain / max(cost, 1)
            if value > best_value:
                best, best_value, best_cost = s.name, value, cost
        if best is None:
            break
        kept[best] += 1
        if compression is not None:
            used += best_cost
        if kept[best] == next(s.channels for s in sites if s.name == best):
            open_sites.discard(best)
    return kept
