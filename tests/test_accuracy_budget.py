"""The equal-accuracy-loss budget: hand-made curves, and the on-disk cache of the one-site curves."""

import pytest
import torch
from conftest import make_mlp

from subprune.accuracy_budget import equal_accuracy_keep, equal_accuracy_plan, one_site_curves
from subprune.budgets import ParameterCounter
from subprune.pipeline import PruneConfig, prune
from subprune.sites import PruningSite, find_sites


def _sites(*channels):
    return [PruningSite(f"s{i}", f"s{i}", f"c{i}", (), n, 1) for i, n in enumerate(channels)]


def test_plan_uses_one_accuracy_level_and_gives_leftovers_to_the_widest_site():
    grid = [0.25, 0.5, 0.75, 1.0]
    sites = _sites(4, 8)
    # s0 is robust (0.9 already at 1/4), s1 is not; the dip of s1 at 0.75 is removed by the envelope.
    curves = {"s0": [0.90, 0.95, 0.97, 0.98], "s1": [0.30, 0.80, 0.70, 0.98]}
    # level 0.8: s0 -> 0.25 (1 channel), s1 -> 0.5 (4 channels) = 5 <= 6; level above 0.8 needs s1 at 1.0.
    assert equal_accuracy_plan(sites, curves, grid, total=5) == {"s0": 1, "s1": 4}
    assert equal_accuracy_plan(sites, curves, grid, total=6) == {"s0": 1, "s1": 5}  # leftover -> widest
    assert equal_accuracy_plan(sites, curves, grid, total=12) == {"s0": 4, "s1": 8}
    with pytest.raises(ValueError, match="smallest grid ratio"):
        equal_accuracy_plan(sites, curves, grid, total=2)


def test_curves_are_cached_and_the_keep_meets_a_compression_target(tmp_path):
    model = make_mlp()
    x = torch.randn(96, 10, generator=torch.Generator().manual_seed(0))
    calibration, held_x = x[:64], x[64:]
    held_y = model(held_x).argmax(1)  # labels the dense model gets right: accuracy 1 at ratio 1
    calls = []

    def evaluate(m, images, labels, batch_size):
        calls.append(1)
        return float((m(images).argmax(1) == labels).float().mean())

    config = PruneConfig(method="layer", progress=False)
    grid = [0.25, 0.5, 1.0]
    curves = one_site_curves(model, calibration, (held_x, held_y), config, grid=grid, cache_dir=tmp_path,
                             evaluate=evaluate)
    assert len(calls) == 2 * 3 and set(curves) == {"0", "2"}
    assert all(c[-1] == 1.0 for c in curves.values())
    again = one_site_curves(model, calibration, (held_x, held_y), config, grid=grid, cache_dir=tmp_path,
                            evaluate=evaluate)
    assert again == curves and len(calls) == 6  # from the cache
    keep = equal_accuracy_keep(model, calibration, (held_x, held_y), PruneConfig(method="layer", compression=2),
                               grid=grid, cache_dir=tmp_path)
    sites, _ = find_sites(model, x[:2])
    kept = {s.name: round(keep[s.name] * s.channels) for s in sites}
    counter = ParameterCounter(model, sites)
    assert counter.count(kept) <= counter.dense / 2
    result = prune(model, calibration, PruneConfig(method="layer", keep=keep, progress=False))
    assert [s.kept for s in result.sites] == [kept["0"], kept["2"]]
