"""The torch.fx adapter of the per-site step: a :class:`subprune.sites.PruningSite` as a solver system.

A site found in a traced graph has one or more consumers (several after a
concatenation, a coupled residual site's every reader); each consumer j reads
``span_j`` of its input channels from ``start_j`` (moved by earlier cuts: the
:class:`subprune.surgery.ChannelLayout`), ``kernel_j`` weight columns per
channel. The selection sees the consumers stacked into one problem
(:func:`subprune.solver.stack_problems`); each consumer is refit on its own
statistics; the cut is :func:`subprune.surgery.prune_site_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subprune.core.site import ConsumerPart, SiteReport, SiteSolution, SiteSystem
from subprune.methods import SiteProblem
from subprune.sites import PruningSite
from subprune.solver import ridge_value, stack_problems
from subprune.statistics import GramStatistics
from subprune.surgery import ChannelLayout, consumer_weight_matrix, get_module, prune_site_


@dataclass
class GraphSiteAdapter:
    """Builds, cuts and reports fx-graph sites for :func:`subprune.core.site.prune_site`.

    Parameters
    ----------
    layout : ChannelLayout or None
        Where earlier cuts moved the sites' columns in the model being pruned
        (None: the model is still dense, e.g. for the objective curves).
    scores : Tensor of shape (channels,), optional
        The method's channel scores of the site being pruned (baselines).
    reweight : bool
        Write the refit weights (else the surgery keeps the old columns).
    ridge : float
        The run's relative ridge (for the report).
    """

    layout: ChannelLayout | None = None
    scores: Tensor | None = None
    reweight: bool = True
    ridge: float = 0.0

    def system(self, model: nn.Module, site: PruningSite, stats: list[GramStatistics]) -> SiteSystem:
        """Consumer weights of ``site`` in ``model`` and the (stacked) problem the selection sees.

        Raises
        ------
        ValueError
            If a consumer weight holds NaN or infinite values.
        """
        parts = []
        for ref, stat in zip(site.consumers, stats, strict=True):
            start = (ref.start if self.layout is None else self.layout.start(ref.module, "in", ref.start)) * ref.kernel
            full = consumer_weight_matrix(get_module(model, ref.module))  # (d, m)
            weight = full[start : start + ref.span * ref.kernel].to(stat.gram_)  # (n g_j, m)
            if not torch.isfinite(weight).all():
                raise ValueError(f"the weight of '{ref.module}' holds NaN or infinite values; fix the model first")
            parts.append(ConsumerPart(ref.module, stat.gram_, stat.cross_, weight, stat.target_energy(weight),
                                      site.consumer_group_size(ref), stat.n_rows_))
        if len(parts) == 1:
            p = parts[0]
            gram, cross, weight, group_size = p.gram, p.cross, p.weight, p.group_size
        else:
            gram, weight, cross, group_size = stack_problems(
                [p.gram for p in parts], [p.weight for p in parts], [p.group_size for p in parts],
                [p.cross for p in parts])
        problem = SiteProblem(gram, cross, weight, sum(p.energy for p in parts), group_size, site.channels,
                              self.scores)
        return SiteSystem(problem, parts)

    def cut(self, model: nn.Module, site: PruningSite, system: SiteSystem, solution: SiteSolution) -> None:
        """:func:`subprune.surgery.prune_site_` with the refit weights (or the old columns without reweighting)."""
        weights = {p.name: w for p, w in zip(system.consumers, solution.weights, strict=True)}
        prune_site_(model, site, solution.keep, weights if self.reweight else None, self.layout)

    def report(self, site: PruningSite, system: SiteSystem, solution: SiteSolution) -> SiteReport:
        """The site's :class:`subprune.core.site.SiteReport`."""
        keep = solution.keep
        return SiteReport(
            site.name, site.producer, site.consumer, site.channels, int(keep.numel()), system.problem.group_size,
            solution.objective, solution.curve, keep.tolist(), system.consumers[0].rows,
            ridge_value(system.problem.gram, solution.ridge), producers=[p.module for p in site.producers],
            consumers=[c.module for c in site.consumers], coupled=site.coupled,
        )
