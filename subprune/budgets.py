"""Per-site budgets: how many channels each pruning site keeps.

A target is a keep ratio of channels or a compression ratio of whole-network
parameters (dense / pruned; the paper uses 2, 4, 8, 16, 32, 64). Parameter
counts are computed from the module shapes, not by pruning
(:class:`ParameterCounter`). The budget across sites is uniform (one keep
ratio; for a compression target found by binary search), follows a global
ranking of channel scores (the global baselines), or comes from the objective
curves f(S_k) of every site (:func:`curve_plan`). Source: El Halabi et al.,
NeurIPS 2022, Sec. 5 and App. (per-layer budgets); docs/methods.md, "Budgets".
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
    Exact for any sites, coupled ones included: a Linear/Conv2d weight of shape
    (out, in, ...) keeps out' * in' / (out * in) of its elements, where out' and
    in' subtract the units every site removes from its output (it is one of the
    site's producers) or input (one of its consumers); its bias follows out'. A
    BatchNorm's affine parameters follow its features, a grouped convolution
    carried by a site keeps its whole groups. Every other parameter is unchanged.
    """

    def __init__(self, model: nn.Module, sites: list[PruningSite]) -> None:
        self.dense = sum(p.numel() for p in model.parameters())
        self._sites = {s.name: s for s in sites}
        # module -> {"out": [(site, indices per unit)], "in": [...]}: what each site removes from its dimensions
        cuts: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for s in sites:
            for ref in (*s.producers, *s.sliced):
                cuts.setdefault(ref.module, {"out": [], "in": []})["out"].append((s.name, ref.span // s.channels))
            for ref in s.consumers:
                per_unit = ref.span // s.channels * (ref.kernel if isinstance(get_module(model, ref.module),
                                                                               nn.Linear) else 1)
                cuts.setdefault(ref.module, {"out": [], "in": []})["in"].append((s.name, per_unit))
            for name in s.groupwise:  # whole groups: output channels and groups go together
                module = get_module(model, name)
                cuts.setdefault(name, {"out": [], "in": []})["out"].append(
                    (s.name, module.out_channels // module.groups))
        # (out size, in size, parameters per (out, in) pair, parameters per out unit, out cuts, in cuts)
        self._modules: list[tuple[int, int, int, int, list, list]] = []
        fixed = self.dense
        for name, cut in cuts.items():
            module = get_module(model, name)
            own = sum(p.numel() for p in module.parameters(recurse=False))
            fixed -= own
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._modules.append((module.num_features, 1, 0, own // module.num_features, cut["out"], []))
                continue
            bias = 0 if module.bias is None else 1
            if isinstance(module, nn.Linear):
                n_out, n_in = module.out_features, module.in_features
            else:  # a grouped conv's weight holds in/groups inputs per output; its groups shrink with out
                n_out, n_in = module.out_channels, module.in_channels // module.groups
            self._modules.append((n_out, n_in, module.weight.numel() // (n_out * n_in), bias, cut["out"], cut["in"]))
        # Parameters sliced by graph operations (functional norms, LayerScale, embeddings): numel per index, cuts.
        params = dict(model.named_parameters())
        slices: dict[str, tuple[int, int, list]] = {}
        for s in sites:
            for ref in s.parameters:
                if ref.name in params:  # buffers (running statistics) are not parameters
                    tensor = params[ref.name]
                    size = tensor.shape[ref.axis]
                    entry = slices.setdefault(ref.name, (size, tensor.numel() // size, []))
                    entry[2].append((s.name, ref.span // s.channels))
        for size, per_index, cut in slices.values():
            fixed -= size * per_index
            self._modules.append((size, 1, 0, per_index, cut, []))
        self._fixed = fixed

    def count(self, kept: Mapping[str, int]) -> int:
        """Parameters of the network when site ``name`` keeps ``kept[name]`` channels (others: all)."""
        def size(full: int, cuts: list[tuple[str, int]]) -> int:
            return full - sum((self._sites[s].channels - kept.get(s, self._sites[s].channels)) * w for s, w in cuts)

        total = self._fixed
        for n_out, n_in, per_pair, per_out, out_cuts, in_cuts in self._modules:
            out = size(n_out, out_cuts)
            total += per_pair * out * size(n_in, in_cuts) + per_out * out
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
