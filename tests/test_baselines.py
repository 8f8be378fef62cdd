"""Baselines, compression targets and budgets, checked against hand computations on tiny models."""

import pytest
import torch
from conftest import make_conv_net, make_mlp

from subprune.baselines import (
    ScoreContext,
    act_grad_scores,
    default_loss,
    greedy_fs_scores,
    sensitivity_scores,
    weight_norm_scores,
)
from subprune.budgets import ParameterCounter, curve_plan, global_plan, keep_ratio_for_compression, kept_channels
from subprune.evaluate import count_parameters
from subprune.methods import SiteProblem, sampled_selection
from subprune.models.cnn import ARCHITECTURES, CifarResNet
from subprune.pipeline import PruneConfig, prune
from subprune.sites import PruningSite, find_sites
from subprune.surgery import prune_model


def _inputs(n=64, seed=3):
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))


def _context(model, x, labels=None):
    sites, _ = find_sites(model, x[:2])
    return sites, ScoreContext(model, sites, x, labels, default_loss, 16, torch.Generator().manual_seed(0))


def test_layer_weightnorm_keeps_the_largest_l1_columns():
    model, x = make_mlp(), _inputs()
    result = prune(model, x, PruneConfig(method="layer-weightnorm", keep=0.5, reweight=False, progress=False))
    for site, consumer in zip(result.sites, (model[2], model[4]), strict=True):
        l1 = consumer.weight.detach().abs().sum(dim=0)  # (n,): column c = outgoing weights of channel c
        expected = sorted(torch.topk(l1, site.kept).indices.tolist())
        assert site.keep == expected and site.kept == round(0.5 * site.channels)


def test_random_is_seeded_and_keeps_the_budget():
    model, x = make_mlp(), _inputs()

    def keeps(seed, method="layer-random"):
        cfg = PruneConfig(method=method, keep=0.5, seed=seed, progress=False)
        return [s.keep for s in prune(model, x, cfg).sites]

    assert keeps(0) == keeps(0)
    assert keeps(0) != keeps(1)
    assert [len(k) for k in keeps(2)] == [8, 6]
    assert sum(len(k) for k in keeps(2, "random")) == 14  # global: same total, any split


def test_actgrad_refuses_unlabeled_data_and_matches_a_hand_computation():
    model, x = make_mlp(), _inputs()
    with pytest.raises(ValueError, match="needs labelled calibration data.*labels="):
        prune(model, x, PruneConfig(method="actgrad", progress=False))
    with pytest.raises(ValueError, match="one label per calibration sample"):
        prune(model, x, PruneConfig(method="layer-actgrad", progress=False), labels=torch.zeros(3, dtype=torch.long))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="labels range over 0..63 but the model has 3 outputs"):
        prune(model, x, PruneConfig(method="actgrad", progress=False), labels=torch.arange(64) % 100)
    with pytest.raises(ValueError, match="needs integer class labels"):
        prune(model, x, PruneConfig(method="actgrad", progress=False), labels=torch.zeros(64))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    _, context = _context(model, x, labels)
    scores = act_grad_scores(context)
    # By hand: a = relu(first layer), g = d(summed cross-entropy)/da per sample; score = mean_s |a g|.
    a = model[1](model[0](x)).detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model[4](model[3](model[2](a))), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(scores["0"], (a * grad).abs().mean(dim=0).double())
    result = prune(model, x, PruneConfig(method="layer-actgrad", keep=0.25, progress=False), labels=labels)
    assert result.sites[0].keep == sorted(torch.topk(scores["0"], 4).indices.tolist())


def test_sensitivity_is_the_max_energy_share():
    model, x = make_mlp(), _inputs()
    _, context = _context(model, x)
    a = model[1](model[0](x)).detach()  # (N, 16), consumer model[2]
    energy = a.square() * model[2].weight.detach().square().sum(dim=0)  # (N, 16): ||a_c W_c||^2
    share = energy / energy.sum(dim=1, keepdim=True)
    torch.testing.assert_close(sensitivity_scores(context)["0"], share.max(dim=0).values.double())


def test_conv_sensitivity_shares_sum_to_one_per_sample():
    model, images = make_conv_net(), torch.randn(8, 1, 14, 14)
    sites, context = _context(model, images)
    scores = sensitivity_scores(context)
    for s in sites:
        assert scores[s.name].shape == (s.channels,)
        assert float(scores[s.name].max()) <= 1 + 1e-9 and float(scores[s.name].sum()) >= 1 - 1e-9


def test_sampling_draws_distinct_channels_by_score():
    scores = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0])
    problem = SiteProblem(torch.eye(5), None, torch.ones(5, 1), 1.0, 1, 5, scores)
    picks = [sampled_selection(problem, 2, 0.0, 0.0, torch.Generator().manual_seed(s)).keep.tolist()
             for s in range(20)]
    assert all(p == [1, 3] for p in picks)  # zero-score channels (prob ~1e-12) never come first
    full = sampled_selection(problem, 5, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert full.keep.tolist() == [0, 1, 2, 3, 4] and full.order[:2].tolist() in ([1, 3], [3, 1])


def _sites(*channels):
    return [PruningSite(f"s{i}", f"s{i}", f"c{i}", (), n, 1) for i, n in enumerate(channels)]


def test_global_plan_normalises_per_site_and_keeps_one_per_site():
    sites = _sites(3, 3)
    scores = {"s0": torch.tensor([1.0, 0.9, 0.1]), "s1": torch.tensor([10.0, 2.0, 1.0])}  # s1 / 10: 1, .2, .1
    assert global_plan(sites, scores, total=4) == {"s0": 2, "s1": 2}
    assert global_plan(sites, scores, total=2) == {"s0": 1, "s1": 1}
    assert global_plan(sites, {"s0": torch.zeros(3), "s1": scores["s1"]}, total=3) == {"s0": 1, "s1": 2}


def test_curve_plan_follows_marginal_gains_and_keeps_the_total():
    sites = _sites(3, 4)
    curves = {"s0": torch.tensor([0.5, 0.9, 1.0]), "s1": torch.tensor([0.2, 0.4, 0.6, 0.8])}
    assert curve_plan(sites, curves, total=4) == {"s0": 2, "s1": 2}
    assert curve_plan(sites, curves, total=5) == {"s0": 2, "s1": 3}
    assert curve_plan(sites, curves, total=100) == {"s0": 3, "s1": 4}


def test_parameter_counter_equals_the_pruned_model():
    model, images = make_conv_net(), torch.randn(4, 1, 14, 14)
    sites, _ = find_sites(model, images[:2])
    counter = ParameterCounter(model, sites)
    kept = {"conv1": 2, "conv2": 5, "fc1": 7, "fc2": 3}
    keep = {s.name: torch.arange(kept[s.name]) for s in sites}
    assert counter.count(kept) == count_parameters(prune_model(model, sites, keep))
    assert counter.count({}) == count_parameters(model)


def test_parameter_counter_counts_every_module_of_coupled_residual_sites():
    torch.manual_seed(0)
    model = CifarResNet(n=1, widths=(4, 8, 16), shortcut="B", in_channels=1).eval()
    sites, _ = find_sites(model, torch.randn(2, 1, 16, 16), coupled=True)
    assert sum(len(s.producers) > 1 for s in sites) == 3  # stem + block 0, and the two option-B stages
    counter = ParameterCounter(model, sites)
    kept = {s.name: s.channels // 2 for s in sites}
    keep = {s.name: torch.arange(kept[s.name]) for s in sites}
    assert counter.count(kept) == count_parameters(prune_model(model, sites, keep))


@pytest.mark.parametrize("compression", [2, 4, 8, 16])
def test_compression_search_meets_its_target_within_one_channel_step(compression):
    model, images = make_conv_net(), torch.randn(4, 1, 14, 14)
    sites, _ = find_sites(model, images[:2])
    counter = ParameterCounter(model, sites)
    ratio = keep_ratio_for_compression(counter, sites, compression)
    plan = {s.name: kept_channels(ratio, s.channels) for s in sites}
    above = {s.name: kept_channels(ratio + 1e-12, s.channels) for s in sites}  # the next channel step
    assert counter.count(plan) <= counter.dense / compression < counter.count(above)
    assert 1 <= sum(above.values()) - sum(plan.values()) <= 2  # one step: one channel (two sites tie at most)
    scores = {s.name: torch.rand(s.channels, generator=torch.Generator().manual_seed(1)) for s in sites}
    ranked = global_plan(sites, scores, counter=counter, compression=compression)
    assert counter.count(ranked) <= counter.dense / compression


def test_prune_with_compression_and_curve_budget():
    model, images = make_conv_net(), torch.randn(64, 1, 14, 14)
    dense = count_parameters(model)
    for method, budget in (("layer", "curve"), ("weightnorm", "uniform"), ("layer-sampling", "uniform")):
        result = prune(model, images, PruneConfig(method=method, compression=4, budget=budget, progress=False))
        assert dense / count_parameters(result.model) >= 4
    uniform = prune(model, images, PruneConfig(method="asym", keep=0.5, progress=False))
    curve = prune(model, images, PruneConfig(method="asym", keep=0.5, budget="curve", progress=False))
    assert sum(s.kept for s in curve.sites) == sum(s.kept for s in uniform.sites)


def test_bad_targets_and_budgets_are_refused():
    with pytest.raises(ValueError, match="sets its own budget"):
        PruneConfig(method="weightnorm", budget="curve")
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(keep={"fc1": 0.5}, compression=4)
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(keep=0.25, compression=4)  # a float keep is no longer silently dropped
    assert PruneConfig().keep == 0.5 and PruneConfig(compression=4).keep is None
    with pytest.raises(ValueError, match="names no layer"):
        PruneConfig(layers=())
    with pytest.raises(ValueError, match="names no site"):
        PruneConfig(keep={})
    with pytest.raises(ValueError, match="compression=0.5"):
        PruneConfig(compression=0.5)
    with pytest.raises(ValueError, match="cannot be reached"):
        prune(make_mlp(), _inputs(), PruneConfig(method="layer", compression=1000, progress=False))


def test_greedy_fs_first_steps_match_a_hand_computation():
    model, x = make_mlp(), _inputs()
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(4))
    sites, context = _context(model, x, labels)
    context = ScoreContext(model, sites, x, labels, default_loss, 16, torch.Generator(), {"0": 2, "2": 1})
    scores = greedy_fs_scores(context)
    a = model[1](model[0](x)).detach()  # (64, 16): consumer input of site "0"

    @torch.no_grad()
    def loss(mask, batch):
        rows = slice(16 * batch, 16 * batch + 16)
        out = model[4](model[3](model[2](a[rows] * mask)))
        return float(torch.nn.functional.cross_entropy(out, labels[rows], reduction="sum"))

    first = min(range(16), key=lambda c: loss(torch.eye(16)[c], 0))
    second = min((c for c in range(16) if c != first), key=lambda c: loss(torch.eye(16)[[first, c]].sum(0), 1))
    assert scores["0"].nonzero().squeeze(1).tolist() == sorted([first, second])
    assert scores["0"][first] == 16 and scores["0"][second] == 15
    assert int((scores["2"] > 0).sum()) == 1
    with pytest.raises(ValueError, match="needs labelled"):
        prune(model, x, PruneConfig(method="layer-greedyfs", progress=False))


def test_baseline_scores_read_every_consumer_of_a_site():
    model = ARCHITECTURES["inception"](0)
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    sites, _ = find_sites(model, x[:2])
    context = ScoreContext(model, sites, x, labels, default_loss, 8, torch.Generator().manual_seed(0))
    scores = weight_norm_scores(context)
    stem = sum(getattr(model, c).weight.detach().abs().sum(dim=(0, 2, 3)) for c in ("b1", "b2a", "b3"))
    torch.testing.assert_close(scores["stem.0"], stem.double(), rtol=1e-5, atol=0)  # three consumers
    mix = model.mix.weight.detach()[:, 8:24].abs().sum(dim=(0, 2, 3))  # b2b sits at input 8..23 of "mix"
    torch.testing.assert_close(scores["b2b"], mix.double(), rtol=1e-5, atol=0)
    assert {name: s.shape for name, s in act_grad_scores(context).items()} == {s.name: (s.channels,) for s in sites}
    assert all(0 <= float(s.min()) and float(s.max()) <= 1 for s in sensitivity_scores(context).values())
    with pytest.raises(ValueError, match="GreedyFS evaluates candidates at one consumer"):
        greedy_fs_scores(context)


def test_baselines_score_and_prune_coupled_option_a_sites():
    model = ARCHITECTURES["cifar-resnet20"](0)
    x, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    sites, _ = find_sites(model, x[:2], coupled=True)
    context = ScoreContext(model, sites, x, labels, default_loss, 8, torch.Generator().manual_seed(0))
    for score in (weight_norm_scores, act_grad_scores, sensitivity_scores):
        scores = score(context)
        assert {n: (v.shape, bool(torch.isfinite(v).all())) for n, v in scores.items()} == {
            s.name: ((s.channels,), True) for s in sites}
    result = prune(model, x, PruneConfig(method="weightnorm", keep=0.5, reweight=False, coupled=True, progress=False))
    assert len(result.sites) == 14 and count_parameters(result.model) < count_parameters(model) / 2
    with torch.no_grad():
        assert result.model(x).shape == (8, 10)
