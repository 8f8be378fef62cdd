"""One pruning site's step, the same for every architecture and method: selection -> refit -> surgery.

An adapter knows the architecture: it turns a site's statistics and the
model's consumer weights into a :class:`SiteSystem` (the problem the method's
selection function sees, and one :class:`ConsumerPart` per consumer that is
refit), and it cuts the model once the channels and weights are chosen.
:func:`solve_site` is the maths in between and knows no ``nn.Module``:

1. ``keep = select(problem, k, ...)`` (greedy on F(S), a baseline's ranking, ...);
2. per consumer j, the new weight on the kept columns: the least-squares refit
   W'_S = G_SS^+ (C W)_S (:func:`subprune.solver.refit`), or the old columns
   W_S without reweighting;
3. f(S) of the weights written: sum_j ||A_j W_j||^2 f_j / sum_j ||A_j W_j||^2
   (:func:`subprune.solver.weights_objective`).

Source: El Halabi et al., NeurIPS 2022, Sec. 3-4 (F(S), the refit);
docs/how-it-works.md, "Gram form".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from subprune import validation
from subprune.distributed import check_same_selection
from subprune.methods import SelectFn, SiteProblem
from subprune.solver import group_columns, refit, weights_objective

log = logging.getLogger(__name__)


@dataclass
class SiteReport:
    """What was done at one site (every driver and architecture reports the same fields).

    Attributes
    ----------
    name, producer, consumer : str
    channels : int
        Producer channels before pruning.
    kept : int
    group_size : int
    objective : float
        f(S) of the weights written to the consumer: the share of the consumer's
        pre-activation energy (on the calibration set) that the pruned model keeps.
    objective_curve : list of float
        Greedy's f(S_1..S_k) with refit weights (empty for methods without it).
    keep : list of int
        Sorted kept channel indices.
    rows : int
        Rows of B (samples or patches) that the statistics summed.
    ridge : float
        Absolute ridge added to G.
    seconds : float
        Wall-clock of statistics, selection, refit and surgery of this site.
    producers, consumers : list of str
        Every producer and consumer of the site (several for coupled sites or
        channels read by several layers).
    coupled : bool
        The site ties several producers through residual additions.
    """

    name: str
    producer: str
    consumer: str
    channels: int
    kept: int
    group_size: int
    objective: float
    objective_curve: list[float] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)
    rows: int = 0
    ridge: float = 0.0
    seconds: float = 0.0
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    coupled: bool = False


@dataclass(frozen=True)
class ConsumerPart:
    """One consumer of a site, as the refit sees it.

    Attributes
    ----------
    name : str
        The consumer module's name (messages).
    gram : Tensor of shape (d_j, d_j), float64
        G_j = B_j^T B_j over the site's columns of this consumer.
    cross : Tensor of shape (d_j, d_j), float64, or None
        C_j = B_j^T A_j (asymmetric target); None: C_j = G_j.
    weight : Tensor of shape (d_j, m_j), float64
        W_j, the consumer weight on the site's columns.
    energy : float
        ||A_j W_j||_F^2.
    group_size : int
        Columns of this consumer per channel.
    rows : int
        Rows M that the statistics summed.
    """

    name: str
    gram: Tensor
    cross: Tensor | None
    weight: Tensor
    energy: float
    group_size: int
    rows: int


@dataclass(frozen=True)
class SiteSystem:
    """What :func:`solve_site` needs of one site.

    Attributes
    ----------
    problem : SiteProblem
        What the selection function sees (the consumers stacked when several).
    consumers : list of ConsumerPart
        What is refit, in the order the adapter cuts them.
    extra : object, optional
        The adapter's own data for its ``cut`` (e.g. first moments for a bias).
    """

    problem: SiteProblem
    consumers: list[ConsumerPart]
    extra: Any = None


@dataclass(frozen=True)
class SiteOptions:
    """The run's settings that the per-site step reads.

    Attributes
    ----------
    reweight : bool
        Refit the consumer weights by least squares (else keep the old columns).
    epsilon : float
        Stochastic greedy parameter in [0, 1).
    ridge : float
        Relative ridge >= 0 (times mean(diag G)).
    distributed : bool
        Check that every process of the default group selected the same channels.
    warn_rows : float
        Warn when a least-squares fit has fewer than ``warn_rows`` x columns rows
        (it nearly interpolates the calibration set).
    interpolation_ridge : float
        Relative ridge used instead of ``ridge`` (where larger) at a site where a
        consumer has fewer than ``warn_rows`` x kept columns rows, for the
        selection and the refit (``PruneConfig.interpolation_ridge``).
    """

    reweight: bool = True
    epsilon: float = 0.0
    ridge: float = 0.0
    distributed: bool = False
    warn_rows: float = 2.0
    interpolation_ridge: float = 0.0


@dataclass(frozen=True)
class SiteSolution:
    """The channels kept and the consumer weights to write.

    Attributes
    ----------
    keep : Tensor of shape (k,), int64, sorted
    weights : list of Tensor of shape (k * g_j, m_j), float64
        Refit (or sliced) weight of each consumer, in the order of ``SiteSystem.consumers``.
    objective : float
        f(S) of those weights over all consumers.
    curve : list of float
        The selection's f(S_1..S_k) (empty for methods without it).
    ridge : float
        The relative ridge the selection and the refit used.
    """

    keep: Tensor
    weights: list[Tensor]
    objective: float
    curve: list[float]
    ridge: float = 0.0


class SiteAdapter(Protocol):
    """An architecture's side of one site's step."""

    def system(self, model: nn.Module, site: Any, stats: Any) -> SiteSystem:
        """The site's problem from its statistics and the consumer weights of ``model``."""

    def cut(self, model: nn.Module, site: Any, system: SiteSystem, solution: SiteSolution) -> None:
        """Slice the producers and write the consumer weights of ``solution`` into ``model``, in place."""

    def report(self, site: Any, system: SiteSystem, solution: SiteSolution) -> Any:
        """What the run reports for the site (:class:`subprune.SiteReport`)."""


def solve_site(
    name: str,
    system: SiteSystem,
    k: int,
    select: SelectFn,
    options: SiteOptions,
    generator: torch.Generator,
) -> SiteSolution:
    """Choose ``k`` channels with ``select`` and the consumer weights on them (no nn.Module).

    Parameters
    ----------
    name : str
        The site's name (messages).
    system : SiteSystem
    k : int
        Channels to keep, 1 <= k <= ``system.problem.channels``.
    select : SelectFn
        The method's selection function.
    options : SiteOptions
    generator : torch.Generator
        For stochastic greedy and sampled selections.

    Returns
    -------
    SiteSolution

    Raises
    ------
    ValueError
        From the selection function (a bad k, scores of the wrong shape).
    RuntimeError
        With ``options.distributed``, when processes selected different channels.
    """
    ridge = options.ridge
    if any(part.rows < options.warn_rows * k * part.group_size for part in system.consumers):
        ridge = max(ridge, options.interpolation_ridge)  # the refit would (nearly) interpolate the calibration set
    selection = select(system.problem, k, options.epsilon, ridge, generator)
    keep = selection.keep
    if options.distributed:
        check_same_selection(name, keep)
    # a refit, or greedy's own refits: least squares near or past interpolation (double-descent peak at rows = columns)
    if options.reweight or selection.objective is not None:
        for part in system.consumers:
            columns = keep.numel() * part.group_size
            if part.rows < options.warn_rows * columns:
                log.warning(
                    "site %s, consumer %s: %d calibration rows for %d refit columns: the refit (nearly) interpolates "
                    "the calibration set and f(S) overstates what is kept; %s",
                    name, part.name, part.rows, columns, validation.interpolation_advice(ridge),
                )
    weights, kept_energy = [], 0.0
    for part in system.consumers:
        if options.reweight:
            new_w = refit(part.gram, part.weight, keep, part.group_size, cross=part.cross, ridge=ridge)
        else:
            new_w = part.weight[group_columns(keep.to(part.weight.device), part.group_size)]
        f = weights_objective(part.gram, part.weight, part.energy, keep, new_w, part.group_size, cross=part.cross)
        kept_energy += part.energy * f if len(system.consumers) > 1 else f
        weights.append(new_w)
    energy = system.problem.target_energy
    if len(system.consumers) > 1:
        objective = kept_energy / energy if energy > 0 else 0.0
    else:
        objective = kept_energy
    curve = [] if selection.objective is None else selection.objective.tolist()
    return SiteSolution(keep, weights, objective, curve, ridge)


def prune_site(
    model: nn.Module,
    site: Any,
    stats: Any,
    k: int,
    adapter: SiteAdapter,
    select: SelectFn,
    options: SiteOptions,
    generator: torch.Generator,
) -> Any:
    """Select, refit and cut one site of ``model`` in place; return the adapter's report of it.

    The one per-site step of every driver (:func:`subprune.prune` on fx graphs,
    the block engine on transformers): ``adapter.system`` -> :func:`solve_site`
    -> ``adapter.cut`` -> ``adapter.report``.

    Parameters
    ----------
    model : nn.Module
        The model under construction (a working copy), edited in place.
    site : the adapter's site (PruningSite, TransformerSite)
    stats : the adapter's statistics of the site (GramStatistics of its consumers)
    k : int
        Channels (units) to keep.
    adapter : SiteAdapter
    select : SelectFn
    options : SiteOptions
    generator : torch.Generator

    Returns
    -------
    SiteReport (of the adapter)
    """
    system = adapter.system(model, site, stats)
    solution = solve_site(site.name, system, k, select, options, generator)
    adapter.cut(model, site, system, solution)
    return adapter.report(site, system, solution)
