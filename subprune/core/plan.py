"""The plan of a run, the same for every architecture: units kept per site, objective curves.

A site here is anything with a ``name`` and a number of ``channels`` (units):
a :class:`subprune.sites.PruningSite` of an fx graph or a
:class:`subprune.hf.architectures.TransformerSite`. The budget rules that turn
curves, scores or a parameter target into a plan are in
:mod:`subprune.budgets` (:func:`~subprune.budgets.curve_plan`,
:func:`~subprune.budgets.global_plan`, :func:`~subprune.budgets.keep_ratio_for_compression`);
the transformer rules built on them (FLAP's structure, a fraction of the
prunable parameters) in :mod:`subprune.hf.budget`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor

from subprune.budgets import kept_channels
from subprune.methods import SiteProblem
from subprune.solver_factored import greedy_select_factored

MIN_CALIBRATION_SAMPLES = 2


class _Site(Protocol):
    name: str
    channels: int


def check_sample_count(n: int, what: str) -> None:
    """ValueError unless ``n`` >= :data:`MIN_CALIBRATION_SAMPLES` calibration samples (``what`` describes them)."""
    if n < MIN_CALIBRATION_SAMPLES:
        raise ValueError(
            f"too few calibration samples: got {n} ({what}), need at least {MIN_CALIBRATION_SAMPLES} "
            f"(N >= {MIN_CALIBRATION_SAMPLES}) samples along dim 0 (a few hundred is typical)"
        )


def plan_units(
    sites: Sequence[_Site], keep: float | Mapping[str, float], found: set[str] = frozenset()
) -> dict[str, int]:
    """Units to keep per site name, from one keep ratio or per-site ratios.

    Parameters
    ----------
    sites : sequence of sites (``name``, ``channels``)
        The sites that may be pruned.
    keep : float or mapping site name -> float
        Keep ratio in (0, 1] of every site, or of the sites named (the others
        are left out of the plan: not pruned).
    found : set of str
        Every site of the model, selected or not (names a mapping may not use).

    Returns
    -------
    dict site name -> units kept
        round(ratio * channels), at least 1 (:func:`subprune.budgets.kept_channels`).

    Raises
    ------
    ValueError
        If ``keep`` names a site that is not in ``sites``.
    """
    if not isinstance(keep, Mapping):
        return {s.name: kept_channels(keep, s.channels) for s in sites}
    names = {s.name for s in sites}
    excluded = sorted((set(keep) - names) & set(found))
    if excluded:
        raise ValueError(f"keep names sites {excluded} that layers= (CLI --layers) leaves out; add them to "
                         "layers or drop them from keep")
    unknown = sorted(set(keep) - names)
    if unknown:
        raise ValueError(f"keep names unknown sites {unknown}; the sites are {sorted(names)}")
    return {s.name: kept_channels(keep[s.name], s.channels) for s in sites if s.name in keep}


def objective_curves(problems: Mapping[str, SiteProblem], ridge: float) -> dict[str, Tensor]:
    """Greedy's whole nested curve f(S_1..S_n), shape (channels,), of every site's problem.

    One greedy run to the full width gives every smaller k (greedy is nested).
    The factored greedy (:func:`subprune.solver_factored.greedy_select_factored`:
    the choices and objective of :func:`subprune.solver.greedy_select`, without
    its d x d residual copy); on a 1,536-neuron FFN site about 30 s of one CPU core.

    Parameters
    ----------
    problems : mapping site name -> SiteProblem
        The dense model's statistics of each site (built by its adapter).
    ridge : float
        Relative ridge >= 0.

    Returns
    -------
    dict site name -> Tensor of shape (channels,), float64
    """
    return {name: greedy_select_factored(p.gram, p.weight, p.target_energy, p.group_size, p.channels,
                                         cross=p.cross, ridge=ridge).objective
            for name, p in problems.items()}
