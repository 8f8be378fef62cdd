"""Budgets of transformer sites: uniform keep ratios, parameter targets, objective curves.

Removing one unit of a site removes a known number of parameters: its producer
rows (weight and bias) and its consumer columns. :func:`parameters_per_unit`
reads them from module shapes; :func:`keep_ratio_for_parameters` bisects the
keep ratio, with the same rounding as the pruning plan, so the pruned model has
at most the target number of parameters. :func:`transformer_budget` chooses
the units per site from the greedy objective curves f(S_k) with
:func:`subprune.budgets.curve_plan` (a transformer site is one layer's
attention heads or one layer's FFN), at the uniform plan's unit counts or at a
global parameter target (:class:`TransformerParameterCounter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from subprune.budgets import curve_plan, keep_ratio_for_compression, kept_channels
from subprune.hf.architectures import FFN, HEADS, TransformerSite, find_transformer_sites, in_features, out_features
from subprune.surgery import get_module


def parameters_per_unit(model: nn.Module, site: TransformerSite) -> int:
    """Parameters removed with one unit of ``site``: producer rows (+ bias) and consumer columns."""
    total = 0
    for part in site.producers:
        module = get_module(model, part.module)
        total += part.width * (in_features(module) + (module.bias is not None))
    return total + site.group_size * out_features(get_module(model, site.consumer))


def kept_units(ratio: float, channels: int) -> int:
    """Units kept at a keep ratio: round(ratio * channels), at least 1 (as the pruning plan)."""
    return max(1, min(channels, round(ratio * channels)))


def keep_ratio_for_parameters(model: nn.Module, target: int, *, heads: bool = True, ffn: bool = True) -> float:
    """The largest uniform keep ratio whose pruned model has at most ``target`` parameters.

    Parameters
    ----------
    model : transformers model
    target : int
        Parameter count of the whole pruned model (embeddings included).
    heads, ffn : bool
        Which kinds of site the ratio applies to (the others are not pruned).

    Returns
    -------
    float
        Keep ratio in (0, 1], within 1e-6 of the threshold; use it as
        ``TransformerPruneConfig(heads=r or None, ffn=r or None)``.

    Raises
    ------
    ValueError
        If even one unit per site leaves more than ``target`` parameters.
    """
    kinds = {kind for kind, wanted in ((HEADS, heads), (FFN, ffn)) if wanted}
    sites = [s for s in find_transformer_sites(model) if s.kind in kinds]
    dense = sum(p.numel() for p in model.parameters())
    per_unit = [parameters_per_unit(model, s) for s in sites]

    def size(ratio: float) -> int:
        removed = (s.channels - kept_units(ratio, s.channels) for s in sites)
        return dense - sum(r * u for r, u in zip(removed, per_unit, strict=True))

    if size(1.0) <= target:
        return 1.0
    if size(0.0) > target:
        raise ValueError(f"target {target:,} parameters is below the smallest reachable size {size(0.0):,} "
                         f"(one unit per pruned site); prune more kinds of site or raise the target")
    low, high = 0.0, 1.0  # size(low) <= target < size(high)
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if size(mid) <= target else (low, mid)
    return low


class TransformerParameterCounter:
    """Whole-model parameter count as a function of the units kept per transformer site.

    The transformer counterpart of :class:`subprune.budgets.ParameterCounter`
    (same ``dense`` / ``count`` / ``budget`` interface, so
    :func:`subprune.budgets.curve_plan` and
    :func:`subprune.budgets.keep_ratio_for_compression` take it): removing one
    unit of a site removes :func:`parameters_per_unit` parameters.

    Parameters
    ----------
    model : transformers model
        The dense model the sites were found in (not modified).
    sites : list of TransformerSite
        The sites that may be pruned.

    Attributes
    ----------
    prunable : int
        The parameters a fraction (``params``) refers to: every parameter of
        the pruned kinds' attention (q/k/v rows, output-projection columns) and
        FFN, counted over the key/value-group sites of those kinds whatever the
        unit, so ``params=0.5`` names the same model size with query-head units
        (which cannot remove the shared keys and values) as with key/value groups.
    """

    def __init__(self, model: nn.Module, sites: list[TransformerSite]) -> None:
        self.dense = sum(p.numel() for p in model.parameters())
        self._units = {s.name: (s.channels, parameters_per_unit(model, s)) for s in sites}
        kinds = {s.kind for s in sites}
        reference = [s for s in find_transformer_sites(model) if s.kind in kinds and s.name in self._units]
        self.prunable = sum(s.channels * parameters_per_unit(model, s) for s in reference)

    def count(self, kept: Mapping[str, int]) -> int:
        """Parameters of the model when site ``name`` keeps ``kept[name]`` units (others: all)."""
        return self.dense - sum((n - kept.get(name, n)) * per_unit for name, (n, per_unit) in self._units.items())

    def budget(self, compression: float) -> int:
        """The parameter count that meets ``compression`` = dense / pruned (counts are integers)."""
        return math.floor(self.dense / compression + 1e-6)

    def compression_for_fraction(self, fraction: float) -> float:
        """The compression ratio that keeps ``fraction`` of the prunable (attention + FFN) parameters."""
        if not 0 < fraction <= 1:
            raise ValueError(f"params={fraction} must be in (0, 1]: the fraction of prunable parameters kept")
        target = math.floor(self.dense - (1 - fraction) * self.prunable + 1e-6)
        return self.dense / max(target, 1)


def transformer_budget(
    sites: list[TransformerSite],
    plan: Mapping[str, int],
    *,
    curves: Mapping[str, Tensor] | None = None,
    counter: TransformerParameterCounter | None = None,
    params: float | None = None,
) -> dict[str, int]:
    """Units kept per site: the uniform plan, or the objective curves, at a global target.

    Parameters
    ----------
    sites : list of TransformerSite
        The sites being pruned (those of ``plan``).
    plan : mapping site name -> units kept
        The uniform plan of the keep ratios (``heads``, ``ffn``).
    curves : mapping site name -> Tensor of shape (channels,), optional
        Greedy's whole nested curve f(S_1..S_n) of every site (dense model's
        statistics). Given: the units go where the curves gain most
        (:func:`subprune.budgets.curve_plan`); without: a uniform keep ratio.
    counter : TransformerParameterCounter, optional
        Needed with ``params``.
    params : float, optional
        Global parameter target: keep this fraction of the prunable parameters
        of ``sites`` (their producer rows and consumer columns). Without it the
        target is the uniform plan's number of units of each kind, heads and FFN
        neurons budgeted separately (a head and a neuron are not comparable
        units).

    Returns
    -------
    dict site name -> units kept
        For a unit target: per kind, the sum equals the uniform plan's. For a
        parameter target: the model has at most the target count; the uniform
        rule is the largest keep ratio that fits, its leftover then spread one
        unit per site at a time over the sites of the cheapest units
        (:func:`fill_uniformly`: with 3 key/value groups a layer, a ratio
        that fits can otherwise leave some 5% of the target unused); the curve
        rule adds units (by gain per parameter) while they fit.

    Raises
    ------
    ValueError
        If the parameter target cannot be reached or ``params`` is given without a counter.
    """
    if params is not None:
        if counter is None:
            raise ValueError("a parameter target needs a TransformerParameterCounter")
        compression = counter.compression_for_fraction(params)
        smallest = counter.count({s.name: 1 for s in sites})
        if smallest > counter.budget(compression):
            raise ValueError(f"params={params} cannot be reached: one unit per pruned site keeps "
                             f"{smallest - (counter.dense - counter.prunable):,} of {counter.prunable:,} prunable "
                             "parameters; ask for a larger fraction")
        if curves is not None:
            plan = round_to_step(sites, curve_plan(sites, curves, counter=counter, compression=compression))
            return fill_uniformly(sites, plan, counter, counter.budget(compression))
        ratio = keep_ratio_for_compression(counter, sites, compression)
        kept = round_to_step(sites, {s.name: kept_channels(ratio, s.channels) for s in sites})
        return fill_uniformly(sites, kept, counter, counter.budget(compression))
    if curves is None:
        return dict(plan)
    kept: dict[str, int] = {}
    for kind in (HEADS, FFN):
        group = [s for s in sites if s.kind == kind]
        if group:
            kept.update(curve_plan(group, curves, total=sum(plan[s.name] for s in group)))
    return kept


def flap_plan(
    sites: list[TransformerSite],
    scores: Mapping[str, Tensor],
    counter: TransformerParameterCounter,
    target: int,
) -> dict[str, int]:
    """FLAP's adaptive structure: one global ranking of standardised unit scores under a parameter budget.

    Every site first keeps its best unit; then units are taken in decreasing
    score over all sites (attention and FFN together, "AL-AM"), each while the
    model still fits ``target`` parameters (a unit that does not fit is
    skipped). Within a site the kept units are its top-scoring ones, so the
    result is a per-site count.

    Parameters
    ----------
    sites : list of TransformerSite
    scores : mapping site name -> Tensor of shape (channels,)
        Standardised scores (:func:`subprune.hf.baselines.flap_standardised_scores`).
    counter : TransformerParameterCounter
    target : int
        Parameter count of the whole pruned model.

    Returns
    -------
    dict site name -> units kept (>= 1 each)

    Raises
    ------
    ValueError
        If one unit per site already exceeds ``target``, or a score vector has the wrong shape.

    Notes
    -----
    Source: An et al., AAAI 2024, Sec. 4.2 (adaptive structure search) and its
    code's ``AL-AM`` branch, which thresholds the sorted scores where the
    cumulative cost (a head counted as 4 head_dim / 3 neurons on LLaMA) reaches
    the kept fraction.
    """
    for s in sites:
        if scores[s.name].shape != (s.channels,):
            raise ValueError(f"scores of site {s.name} must have shape ({s.channels},), "
                             f"got {tuple(scores[s.name].shape)}")
    kept = {s.name: unit_step(s) for s in sites}
    used = counter.count(kept)
    if used > target:
        raise ValueError(f"one unit per site keeps {used:,} parameters, above the target {target:,}")
    entries = []  # (score, site name, cost): every unit (or level of query heads) but each site's best
    for s in sites:
        step = unit_step(s)
        # query-head units: level j = the j-th best head of every group, scored by their mean
        levels = torch.sort(scores[s.name].double().reshape(step, -1), dim=1, descending=True).values.mean(0)
        cost = step * (counter.count({}) - counter.count({s.name: s.channels - 1}))
        entries.extend((float(v), s.name, cost) for v in levels[1:])
    entries.sort(key=lambda e: -e[0])
    steps = {s.name: unit_step(s) for s in sites}
    for _score, name, cost in entries:
        if used + cost <= target:
            kept[name] += steps[name]
            used += cost
    return kept


def unit_step(site: TransformerSite) -> int:
    """Units a site's count moves by: ``kv_groups`` for query-head units (one head in every group), else 1."""
    return site.kv_groups or 1


def round_to_step(sites: list[TransformerSite], kept: Mapping[str, int]) -> dict[str, int]:
    """Round every count down to a multiple of :func:`unit_step` (at least one step): a plan the sites accept."""
    steps = {s.name: unit_step(s) for s in sites}
    return {name: max(steps[name], k // steps[name] * steps[name]) for name, k in kept.items()}


def fill_uniformly(
    sites: list[TransformerSite],
    kept: Mapping[str, int],
    counter: TransformerParameterCounter,
    target: int,
) -> dict[str, int]:
    """Spend what a uniform plan leaves of ``target``: one more unit per site, in rounds, cheapest units first.

    Parameters
    ----------
    sites : list of TransformerSite
    kept : mapping site name -> units kept (the uniform plan, within ``target``)
    counter : TransformerParameterCounter
    target : int
        Parameter count of the whole pruned model.

    Returns
    -------
    dict site name -> units kept
        Still within ``target``; every site of one kind grows by at most one
        step more than any other, so the plan stays as uniform as the budget allows.
    """
    kept = dict(kept)
    used = counter.count(kept)
    cost = {s.name: unit_step(s) * (counter.count({}) - counter.count({s.name: s.channels - 1})) for s in sites}
    order = sorted(sites, key=lambda s: cost[s.name])  # cheapest units first
    grown = True
    while grown:
        grown = False
        for s in order:
            if kept[s.name] + unit_step(s) <= s.channels and used + cost[s.name] <= target:
                kept[s.name] += unit_step(s)
                used += cost[s.name]
                grown = True
    return kept
