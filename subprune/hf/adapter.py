"""The transformer adapter of the per-site step: a :class:`TransformerSite` as a solver system.

What differs from an fx-graph site (:mod:`subprune.graph_adapter`): one
consumer (the attention output or FFN down projection, a Linear or GPT-2's
Conv1D: :func:`~subprune.hf.architectures.consumer_weight`); query-head units
keep the same number in every key/value group (``SiteProblem.parts``); the
statistics carry column sums (:class:`subprune.statistics.GramStatistics` with
``sums=True``) for two bias rules:

* ``intercept``: least squares with a free consumer bias. The greedy methods
  select and refit on centred statistics (:meth:`GramStatistics.centred`), the
  bias gets mu_A W - mu_B,S W' (:meth:`GramStatistics.bias_shift`); the
  baselines keep ranking on the raw statistics.
* FLAP's bias compensation without refit (An et al., AAAI 2024, Eq. 7):
  b' = b + mean(X_pruned) W_pruned (:func:`subprune.hf.baselines.bias_compensation`).

The cut is :func:`subprune.hf.architectures.prune_transformer_site_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subprune.core.site import ConsumerPart, SiteReport, SiteSolution, SiteSystem
from subprune.hf.architectures import TransformerSite, consumer_weight, prune_transformer_site_
from subprune.hf.baselines import MomentProblem, bias_compensation
from subprune.hf.residual import residual_target
from subprune.solver import group_columns, ridge_value
from subprune.statistics import GramStatistics
from subprune.surgery import get_module


def site_parts(site: TransformerSite) -> Tensor | None:
    """The key/value group of each query-head unit, shape (channels,), or None for other sites."""
    if not site.kv_groups:
        return None
    return torch.arange(site.channels) // (site.channels // site.kv_groups)


def moment_problem(model: nn.Module, site: TransformerSite, stats: GramStatistics,
                   parts: Tensor | None = None) -> MomentProblem:
    """The site's raw (uncentred) statistics and consumer weight of ``model`` as a :class:`MomentProblem`."""
    weight = consumer_weight(get_module(model, site.consumer)).to(stats.gram_)  # (d, m)
    return MomentProblem(stats.gram_, stats.cross_, weight, stats.target_energy(weight), site.group_size,
                         site.channels, parts=parts, mean=stats.mean_b_, rows=stats.n_rows_)


@dataclass(frozen=True)
class _Extra:
    stats: GramStatistics
    raw: MomentProblem  # uncentred, for bias compensation and the report's ridge
    intercept: bool


@dataclass(frozen=True)
class TransformerSiteAdapter:
    """Builds, cuts and reports transformer sites for :func:`subprune.core.site.prune_site`.

    Parameters
    ----------
    reweight : bool
        Least-squares refit of the consumer.
    intercept : bool
        Also refit the consumer bias (consumers that have one).
    greedy : bool
        The method maximises F(S) (Layer/Seq/Asym and their swap variants): with
        ``intercept`` it selects on the centred statistics; baselines rank on the raw ones.
    compensate : bool
        Without refit, add FLAP's bias compensation.
    ridge : float
        The run's relative ridge (for the report).
    residual : bool
        The residual-stream target Y = A W + E (AsymInChange; ``stats`` is a
        :class:`subprune.hf.residual.ResidualStatistics`): greedy and refit on
        :func:`subprune.hf.residual.residual_target`.
    """

    reweight: bool = True
    intercept: bool = False
    greedy: bool = True
    compensate: bool = False
    ridge: float = 0.0
    residual: bool = False

    def system(self, model: nn.Module, site: TransformerSite, stats: GramStatistics) -> SiteSystem:
        """The raw problem, or with ``intercept`` the centred one, of ``site`` in ``model``."""
        raw = moment_problem(model, site, stats, site_parts(site))
        if self.residual:  # Y = A W + E: the sublayer's dense output plus the upstream residual error
            cross, energy = residual_target(stats, raw.weight)
            raw = MomentProblem(raw.gram, cross, raw.weight, energy, raw.group_size, raw.channels, parts=raw.parts,
                                mean=raw.mean, rows=raw.rows)
        intercept = self.intercept and get_module(model, site.consumer).bias is not None
        fit = raw
        if intercept:  # covariance form: the objective with a free bias (scores of the baselines stay raw)
            gram_c, cross_c, energy_c = stats.centred(raw.weight)
            fit = MomentProblem(gram_c, cross_c, raw.weight, energy_c, site.group_size, site.channels,
                                parts=raw.parts, mean=raw.mean, rows=raw.rows)
        part = ConsumerPart(site.consumer, fit.gram, fit.cross, raw.weight, fit.target_energy, site.group_size,
                            stats.n_rows_)
        return SiteSystem(fit if self.greedy else raw, [part], _Extra(stats, raw, intercept))

    def cut(self, model: nn.Module, site: TransformerSite, system: SiteSystem, solution: SiteSolution) -> None:
        """Slice q/k/v (or up/gate) rows, write the consumer weight and, by the bias rules, its bias."""
        extra: _Extra = system.extra
        consumer = get_module(model, site.consumer)
        weight, new_weight = extra.raw.weight, solution.weights[0]
        bias = None
        if extra.intercept:
            cols = group_columns(solution.keep.to(weight.device), site.group_size)
            bias = consumer.bias.detach().to(torch.float64) + extra.stats.bias_shift(weight, cols, new_weight)
        elif not self.reweight and self.compensate:  # a bias-free consumer (LLaMA) gains one
            shift = bias_compensation(extra.raw, solution.keep)  # (m,)
            bias = shift if consumer.bias is None else consumer.bias.detach().to(shift) + shift
        prune_transformer_site_(model, site, solution.keep, new_weight, bias)

    def report(self, site: TransformerSite, system: SiteSystem, solution: SiteSolution) -> SiteReport:
        """The site's :class:`subprune.core.site.SiteReport` (producers joined by commas)."""
        extra: _Extra = system.extra
        producers = ",".join(dict.fromkeys(p.module for p in site.producers))
        return SiteReport(site.name, producers, site.consumer, site.channels, int(solution.keep.numel()),
                          site.group_size, solution.objective, solution.curve, solution.keep.tolist(),
                          extra.stats.n_rows_, ridge_value(extra.raw.gram, self.ridge))
