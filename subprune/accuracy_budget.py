"""The paper's equal-accuracy-loss budget: per-site keep ratios from one-site pruning curves.

Each site is pruned alone (the others dense) at a grid of keep ratios with the
run's method and reweighting, and the accuracy is measured on a held-out slice
of the *training* data. Each curve is made monotone (the best accuracy at this
or any smaller ratio), then one accuracy level is found by binary search such
that every site at the smallest ratio reaching that level meets the global
budget (channels or whole-network parameters); channels left over go to the
widest sites. The curves are cached on disk, keyed by a hash of the model's
weights, the data and the settings, so they are computed once. Source: El
Halabi et al., NeurIPS 2022, Sec. 5, after Kuzmin et al. 2019 ("Taxonomy and
evaluation of structured compression of convolutional neural networks");
docs/methods.md, "Budgets".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from subprune.budgets import ParameterCounter, kept_channels
from subprune.evaluate import accuracy
from subprune.pipeline import MIN_CALIBRATION_SAMPLES, PruneConfig, prune
from subprune.sites import PruningSite, find_sites, select_sites

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Bisection steps on the accuracy level (accuracies are fractions in [0, 1]).
LEVEL_STEPS = 40


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/subprune`` or ``~/.cache/subprune``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "subprune"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
            h.update(str((part.dtype, tuple(part.shape))).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _held_out_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    return accuracy(model, images, labels, batch_size=batch_size)


def one_site_curves(
    model: nn.Module,
    calibration: Tensor,
    held_out: tuple[Tensor, Tensor],
    config: PruneConfig,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    labels: Tensor | None = None,
    cache_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module, Tensor, Tensor, int], float] = _held_out_accuracy,
) -> dict[str, list[float]]:
    """Held-out accuracy of the model with one site pruned, for every site and grid ratio.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    calibration : Tensor of shape (N, ...)
    held_out : (Tensor of shape (H, ...), Tensor of shape (H,))
        Preprocessed inputs and labels of a held-out slice of the training split
        (disjoint from the calibration samples; never the test set).
    config : PruneConfig
        Method, reweighting, seed, layers of the run; its targets are ignored.
    grid : sequence of float
        Keep ratios in (0, 1], increasing.
    labels : Tensor of shape (N,), optional
        Calibration labels, for the methods that need them.
    cache_dir : str or Path, optional
        Where the curves are cached (default :func:`default_cache_dir`).
    evaluate : callable(model, images, labels, batch_size) -> float
        Accuracy on the held-out slice.

    Returns
    -------
    dict site name -> list of accuracies (fractions), one per grid ratio
    """
    grid = [float(r) for r in grid]
    if not grid or any(not 0 < r <= 1 for r in grid) or grid != sorted(grid):
        raise ValueError(f"grid must be increasing keep ratios in (0, 1], got {grid}")
    images, held_labels = held_out
    if images.shape[0] != held_labels.shape[0] or images.shape[0] < 1:
        raise ValueError("held_out must be (inputs, labels) with one label per input")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("keep", "compression", "budget",
                                                                               "progress", "chunk_bytes")}
    key = _digest(*[p for p in model.state_dict().values()], calibration, images, held_labels,
                  labels if labels is not None else "no labels", settings, grid)
    path = Path(cache_dir or default_cache_dir()) / f"one_site_curves_{key}.json"
    if path.exists():
        return json.loads(path.read_text())["curves"]
    device = next(model.parameters()).device
    all_sites, skipped = find_sites(model, calibration[:MIN_CALIBRATION_SAMPLES].to(device))
    sites = select_sites(all_sites, skipped, list(config.layers) if config.layers else None)
    curves = {}
    for site in sites:
        curve = []
        for ratio in grid:
            one = dataclasses.replace(config, keep={site.name: ratio}, compression=None, budget="uniform",
                                      layers=None, progress=False)
            pruned = prune(model, calibration, one, labels=labels).model
            curve.append(evaluate(pruned, images, held_labels, config.batch_size))
        curves[site.name] = curve
        log.info("site %s: held-out accuracy %s", site.name, curve)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"grid": grid, "settings": settings, "curves": curves}))
    tmp.replace(path)
    return curves


def equal_accuracy_plan(
    sites: list[PruningSite],
    curves: dict[str, list[float]],
    grid: Sequence[float],
    total: int | None = None,
    counter: ParameterCounter | None = None,
    compression: float | None = None,
) -> dict[str, int]:
    """Channels per site at one accuracy level of the (monotone) one-site curves.

    For a level L each site takes the smallest grid ratio whose monotone
    accuracy (the best at this or any smaller ratio) is >= L (ratio 1 if none);
    the largest L whose plan fits the budget is found by bisection, and the
    channels or parameters left over go to the widest sites, one channel at a
    time in decreasing width.

    Parameters
    ----------
    sites : list of PruningSite
    curves : dict site name -> accuracies, one per grid ratio
    grid : sequence of float
        Increasing keep ratios of the curves.
    total : int, optional
        Total channels to keep.
    counter, compression : optional
        Instead of ``total``: a whole-network compression ratio.

    Returns
    -------
    dict site name -> channels kept

    Raises
    ------
    ValueError
        If neither or both targets are given, or even the smallest ratios miss the budget.
    """
    if (total is None) == (compression is None):
        raise ValueError("give exactly one of total and compression")
    envelope = {s.name: torch.tensor(curves[s.name], dtype=torch.float64).cummax(0).values for s in sites}

    def plan(level: float) -> dict[str, int]:
        out = {}
        for s in sites:
            reach = (envelope[s.name] >= level).nonzero()
            ratio = grid[int(reach[0])] if reach.numel() else 1.0
            out[s.name] = kept_channels(ratio, s.channels)
        return out

    def cost(p: dict[str, int]) -> float:
        return sum(p.values()) if total is not None else counter.count(p)

    limit = total if total is not None else counter.budget(compression)
    low = min(float(e[0]) for e in envelope.values())  # every site at its smallest grid ratio
    if cost(plan(low)) > limit:
        raise ValueError(f"the budget is below what every site at the smallest grid ratio {grid[0]} keeps; "
                         "extend the grid to smaller ratios or ask for a smaller target")
    high = max(float(e[-1]) for e in envelope.values()) + 1e-9
    for _ in range(LEVEL_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(plan(mid)) <= limit else (low, mid)
    kept = plan(low)
    for s in sorted(sites, key=lambda s: -s.channels):  # leftovers to the widest sites
        while kept[s.name] < s.channels and cost({**kept, s.name: kept[s.name] + 1}) <= limit:
            kept[s.name] += 1
    return kept


def equal_accuracy_keep(
    model: nn.Module,
    calibration: Tensor,
    held_out: tuple[Tensor, Tensor],
    config: PruneConfig,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    labels: Tensor | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Per-site keep ratios of the equal-accuracy-loss rule for ``config``'s target.

    The target is ``config.compression`` when given, else the channels that
    ``config.keep`` (a float) keeps in total. Pass the result as
    ``PruneConfig(keep=...)`` to :func:`subprune.pipeline.prune`. Parameters as
    in :func:`one_site_curves`.

    Returns
    -------
    dict site name -> keep ratio (kept / channels)

    Raises
    ------
    ValueError
        For a method that ranks channels globally, per-site ``keep`` ratios, or a
        budget below the smallest grid ratio.
    """
    from subprune.methods import get_method

    if get_method(config.method).global_ranking:
        raise ValueError(f"method {config.method!r} ranks channels globally; the equal-accuracy budget is for "
                         "methods with per-site budgets")
    if not isinstance(config.keep, (int, float)) and config.compression is None:
        raise ValueError("the equal-accuracy budget needs one keep ratio or a compression ratio as its target")
    curves = one_site_curves(model, calibration, held_out, config, grid=grid, labels=labels, cache_dir=cache_dir)
    device = next(model.parameters()).device
    all_sites, skipped = find_sites(model, calibration[:MIN_CALIBRATION_SAMPLES].to(device))
    sites = select_sites(all_sites, skipped, list(config.layers) if config.layers else None)
    if config.compression is not None:
        kept = equal_accuracy_plan(sites, curves, grid, counter=ParameterCounter(model, sites),
                                   compression=config.compression)
    else:
        total = sum(kept_channels(config.keep, s.channels) for s in sites)
        kept = equal_accuracy_plan(sites, curves, grid, total=total)
    return {s.name: kept[s.name] / s.channels for s in sites}
