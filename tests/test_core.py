"""The one per-site step (subprune.core): direct least squares, first moments, both architectures through it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_conv_net

from subprune import PruneConfig, prune
from subprune.core import site as core_site
from subprune.core.plan import objective_curves, plan_units
from subprune.core.site import ConsumerPart, SiteOptions, SiteSystem, solve_site
from subprune.methods import SiteProblem, greedy_selection
from subprune.solver import greedy_select, stack_problems
from subprune.statistics import GramStatistics


def _part(gen, rows, n, g, m, name):
    b = torch.randn(rows, n * g, generator=gen, dtype=torch.float64)
    w = torch.randn(n * g, m, generator=gen, dtype=torch.float64)
    gram = b.T @ b
    return b, w, ConsumerPart(name, gram, None, w, float((b @ w).square().sum()), g, rows)


def test_two_consumer_site_refits_each_consumer_by_direct_least_squares():
    gen = torch.Generator().manual_seed(0)
    n = 6
    (b1, w1, p1), (b2, w2, p2) = _part(gen, 50, n, 1, 3, "c1"), _part(gen, 50, n, 2, 4, "c2")
    gram, weight, cross, g = stack_problems([p1.gram, p2.gram], [w1, w2], [1, 2], [None, None])
    problem = SiteProblem(gram, cross, weight, p1.energy + p2.energy, g, n)
    solution = solve_site("s", SiteSystem(problem, [p1, p2]), 3, greedy_selection, SiteOptions(),
                          torch.Generator())
    keep = solution.keep
    kept = 0.0
    for b, w, part, new in ((b1, w1, p1, solution.weights[0]), (b2, w2, p2, solution.weights[1])):
        cols = (keep[:, None] * part.group_size + torch.arange(part.group_size)).flatten()
        direct = torch.linalg.lstsq(b[:, cols], b @ w).solution
        torch.testing.assert_close(new, direct, rtol=1e-8, atol=1e-8)
        kept += part.energy - float((b[:, cols] @ direct - b @ w).square().sum())
    assert solution.objective == pytest.approx(kept / (p1.energy + p2.energy), rel=1e-9)


def test_column_sums_stream_and_centre_as_one_shot():
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(40, 5, generator=gen), torch.randn(40, 5, generator=gen)
    w = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    stats = GramStatistics(5, asymmetric=True, sums=True)
    for rows in (slice(0, 13), slice(13, 40)):
        stats.update(b[rows], a[rows])
    b64, a64 = b.double(), a.double()
    torch.testing.assert_close(stats.mean_b_, b64.mean(0))
    torch.testing.assert_close(stats.sum_a_, a64.sum(0))
    gram_c, cross_c, energy = stats.centred(w)
    bc, ac = b64 - b64.mean(0), a64 - a64.mean(0)
    torch.testing.assert_close(gram_c, bc.T @ bc)
    torch.testing.assert_close(cross_c, bc.T @ ac)
    assert energy == pytest.approx(float((ac @ w).square().sum()), rel=1e-9)
    assert len(stats.tensors()) == 5  # G, C, A^T A and both column sums go into an all-reduce
    with pytest.raises(ValueError, match="sums=True"):
        _ = GramStatistics(5).mean_b_


def test_plan_and_curves_are_architecture_free():
    class Site:
        def __init__(self, name, channels):
            self.name, self.channels = name, channels

    sites = [Site("a", 10), Site("b", 3)]
    assert plan_units(sites, 0.5) == {"a": 5, "b": 2}
    assert plan_units(sites, {"b": 0.1}) == {"b": 1}
    with pytest.raises(ValueError, match="unknown sites"):
        plan_units(sites, {"c": 0.5})
    gen = torch.Generator().manual_seed(2)
    b = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    energy = float((b @ w).square().sum())
    curve = objective_curves({"a": SiteProblem(b.T @ b, None, w, energy, 1, 4)}, 0.0)["a"]
    reference = greedy_select(b.T @ b, w, energy, 1, 4).objective
    torch.testing.assert_close(curve, reference, rtol=1e-9, atol=1e-12)


def test_fx_graph_and_transformer_sites_go_through_the_same_step(monkeypatch):
    """Both drivers call subprune.core.site.solve_site (no copy of the select -> refit path)."""
    seen = []
    original = core_site.solve_site

    def spy(name, *args, **kwargs):
        seen.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(core_site, "solve_site", spy)
    images = torch.randn(32, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    result = prune(make_conv_net(), images, PruneConfig(method="seq", keep=0.5, progress=False))
    assert seen == [s.name for s in result.sites]
    transformers = pytest.importorskip("transformers")
    from subprune.hf import TransformerPruneConfig, prune_transformer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = {"input_ids": torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(3))}
    seen.clear()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", batch_size=4))
    assert seen == [s.name for s in result.sites] == ["model.layers.0.heads", "model.layers.0.ffn"]


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_target_energy_summed_directly_equals_the_target_gram_form(precision):
    gen = torch.Generator().manual_seed(4)
    b, a = torch.randn(60, 6, generator=gen), torch.randn(60, 6, generator=gen) + 0.5
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    full = GramStatistics(6, asymmetric=True, sums=True, precision=precision)
    direct = GramStatistics(6, asymmetric=True, sums=True, precision=precision, target_weight=w)
    for rows in (slice(0, 25), slice(25, 60)):
        full.update(b[rows], a[rows])
        direct.update(b[rows], a[rows])
    assert direct.target_gram_ is None
    assert direct.target_energy(w) == pytest.approx(full.target_energy(w), rel=1e-6)
    assert direct.centred(w)[2] == pytest.approx(full.centred(w)[2], rel=1e-6)
    torch.testing.assert_close(direct.cross_, full.cross_)
    with pytest.raises(ValueError, match="target_weight only"):
        direct.target_energy(w + 1)
