"""Statistics, sites, surgery and the whole pipeline on small models, checked against first principles."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_conv_net, make_mlp
from torch import nn

from subprune.pipeline import PruneConfig, collect_statistics, prune
from subprune.sites import find_sites
from subprune.solver import greedy_select, group_columns, refit
from subprune.statistics import GramStatistics, consumer_input_rows
from subprune.surgery import consumer_weight_matrix, prune_site_


def test_streamed_conv_statistics_equal_one_shot_and_reproduce_the_conv():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2).double()
    x = torch.randn(7, 3, 11, 9, dtype=torch.float64)
    stats = GramStatistics(3 * 9)
    for rows in consumer_input_rows(conv, x, chunk_bytes=2000):  # several chunks
        stats.update(rows)
    b = F.unfold(x, 3, dilation=2, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(stats.gram_, b.T @ b)
    assert stats.n_rows_ == b.shape[0]
    # B W is the convolution without bias: the column convention matches the weight layout.
    out = (b @ consumer_weight_matrix(conv)).reshape(7, -1, 5).permute(0, 2, 1)
    expected = (conv(x) - conv.bias[:, None, None]).flatten(2)
    torch.testing.assert_close(out, expected)


def test_sites_follow_the_graph(conv_net, images):
    sites, skipped = find_sites(conv_net, images[:2])
    assert [(s.producer, s.consumer, s.batchnorms, s.channels, s.group_size) for s in sites] == [
        ("conv1", "conv2", ("bn1",), 6, 9),
        ("conv2", "fc1", (), 8, 9),  # conv -> pool -> flatten -> linear: H*W = 3*3 columns per channel
        ("fc1", "fc2", (), 20, 1),
        ("fc2", "head", (), 12, 1),
    ]
    assert [(s.name, "last layer" in s.reason) for s in skipped] == [("head", True)]


def test_residual_branch_is_skipped_with_reason():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + self.b(h))

    sites, skipped = find_sites(Residual(), torch.randn(2, 4))
    assert sites == []
    reasons = {s.name: s.reason for s in skipped}
    assert "branch" in reasons["a"] and "addition" in reasons["b"]


def test_physical_pruning_equals_masked_dense_model(conv_net, images):
    keep = torch.tensor([0, 2, 3, 5])
    site = find_sites(conv_net, images[:2])[0][0]  # conv1 -> bn1 -> conv2
    consumer = conv_net.conv2
    new_w = torch.randn(keep.numel() * 9, 8, dtype=torch.float64)  # any refit weight
    pruned = copy.deepcopy(conv_net)
    prune_site_(pruned, site, keep, new_w)
    masked = copy.deepcopy(conv_net)
    w = torch.zeros(6 * 9, 8, dtype=torch.float64)
    w[group_columns(keep, 9)] = new_w
    with torch.no_grad():
        masked.conv2.weight.copy_(w.T.reshape(consumer.weight.shape))
    assert pruned.conv1.out_channels == 4 and pruned.bn1.num_features == 4 and pruned.conv2.in_channels == 4
    torch.testing.assert_close(pruned.bn1.running_var, conv_net.bn1.running_var[keep])
    torch.testing.assert_close(pruned(images), masked(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
@pytest.mark.parametrize("reweight", [True, False])
def test_prune_shapes_outputs_and_user_model_untouched(method, reweight, conv_net, images):
    before = {k: v.clone() for k, v in conv_net.state_dict().items()}
    modules_before = dict(conv_net.named_modules())
    conv_net.train()
    result = prune(conv_net, images, PruneConfig(method=method, keep=0.5, reweight=reweight, progress=False))
    assert conv_net.training  # flag untouched
    assert dict(conv_net.named_modules()) == modules_before
    for k, v in conv_net.state_dict().items():
        assert torch.equal(v, before[k]), k
    pruned = result.model
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc1.out_features) == (3, 4, 10)
    assert (pruned.fc1.in_features, pruned.fc2.out_features, pruned.head.in_features) == (36, 6, 6)
    assert pruned(images).shape == (96, 4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in conv_net.parameters())
    for site in result.sites:
        assert site.kept == round(site.channels / 2)
        assert -1.0 < site.objective <= 1.0 + 1e-9
        if reweight:  # reported f(S) is greedy's value for the written weights
            assert site.objective == pytest.approx(site.objective_curve[site.kept - 1], abs=1e-8)


class _NormedNet(nn.Module):
    """Conv-BatchNorm-Dropout-Conv-Linear: a model whose training mode would change its outputs and buffers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.drop, self.head = nn.Conv2d(8, 6, 3, padding=1), nn.Dropout(0.5), nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv2(self.drop(torch.relu(self.bn(self.conv1(x)))))
        return self.head(torch.relu(h).mean((2, 3)))


@pytest.mark.parametrize(("method", "budget"), [("asym", "uniform"), ("asym", "curve"), ("layer", "uniform"),
                                                ("layer-actgrad", "uniform")])
def test_the_dense_reference_is_the_users_model_read_only(method, budget, images, monkeypatch):
    """No deep copy for the dense reference: the user's model is read (eval mode, no_grad) and left as it was."""
    torch.manual_seed(0)
    model = _NormedNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    model.train()
    model.drop.eval()  # a mixed mode must be restored module by module
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).eval()
    labels = torch.arange(len(images)) % 4
    config = PruneConfig(method=method, budget=budget, keep=None if budget == "curve" else 0.5,
                         compression=1.5 if budget == "curve" else None, progress=False)
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr("subprune.pipeline.copy.deepcopy",
                        lambda obj, *a: (copies.append(type(obj).__name__), real(obj, *a))[1])
    result = prune(model, images, config, labels=labels)
    assert copies.count("_NormedNet") == 1  # the working copy only
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    monkeypatch.setattr("subprune.pipeline.copy.deepcopy", real)
    expected = prune(reference, images, config, labels=labels)  # an eval-mode model: the same run as before
    assert [s.keep for s in result.sites] == [s.keep for s in expected.sites]
    with torch.no_grad():
        torch.testing.assert_close(result.model(images), expected.model(images), rtol=0, atol=0)


def test_reweighting_keeps_more_energy_than_slicing(conv_net, images):
    common = dict(method="layer", keep=0.5, progress=False)
    with_refit = prune(conv_net, images, PruneConfig(reweight=True, **common))
    without = prune(conv_net, images, PruneConfig(reweight=False, **common))
    for a, b in zip(with_refit.sites, without.sites, strict=True):
        assert a.keep == b.keep  # same selection, only the weights differ
        assert a.objective >= b.objective - 1e-9


def test_keep_ratio_one_reproduces_dense_outputs(conv_net, images):
    held_out = torch.randn(16, 1, 14, 14, generator=torch.Generator().manual_seed(9))
    for method in ("layer", "seq", "asym"):  # no weight is rewritten when nothing is pruned, even with few rows
        result = prune(conv_net, images[:8], PruneConfig(method=method, keep=1.0, progress=False))
        torch.testing.assert_close(result.model(held_out), conv_net(held_out))


def test_asym_target_is_the_dense_model():
    model = make_mlp()
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(3))
    result = prune(model, x, PruneConfig(method="asym", keep=0.5, progress=False))
    # Reproduce by hand: site "0" (consumer "2") has A = B; site "2" (consumer "4") has
    # B from the model with site "0" pruned and refit, A from the dense model.
    with torch.no_grad():
        h_dense = torch.relu(model[0](x)).double()
        g = h_dense.T @ h_dense
        w = consumer_weight_matrix(model[2]).double()
        first = greedy_select(g, w, float((w * (g @ w)).sum()), 1, 8)
        keep0 = first.keep(8)
        w2 = refit(g, w, keep0, 1)
        assert result.sites[0].keep == keep0.tolist()
        h2_pruned = torch.relu(h_dense[:, keep0] @ w2 + model[2].bias.double())  # B of site "2"
        a = torch.relu(model[2](torch.relu(model[0](x)))).double()  # A of site "2"
        w4 = consumer_weight_matrix(model[4]).double()
        second = greedy_select(h2_pruned.T @ h2_pruned, w4, float(((a @ w4) ** 2).sum()), 1, 6,
                               cross=h2_pruned.T @ a)
        keep1 = second.keep(6)
        w4_new = refit(h2_pruned.T @ h2_pruned, w4, keep1, 1, cross=h2_pruned.T @ a)
    assert result.sites[1].keep == keep1.tolist()
    torch.testing.assert_close(result.model[4].weight.double(), w4_new.T, atol=1e-5, rtol=1e-4)
    # and the collected statistics are the paired Gram sums B^T A, A^T A
    halfway = prune(model, x, PruneConfig(method="asym", keep={"0": 0.5}, progress=False)).model
    site = find_sites(model, x[:2])[0][1]
    stats = collect_statistics(halfway, [site], x, dense=model, batch_size=64)[site.name]
    with torch.no_grad():
        b = torch.relu(halfway[2](torch.relu(halfway[0](x)))).double()
    torch.testing.assert_close(stats.gram_, b.T @ b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.cross_, b.T @ a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.target_gram_, a.T @ a, atol=1e-6, rtol=1e-6)


def test_seeded_runs_are_reproducible(images):
    config = PruneConfig(method="seq", keep=0.4, epsilon=0.2, seed=7, progress=False)
    r1, r2 = prune(make_conv_net(), images, config), prune(make_conv_net(), images, config)
    assert [s.keep for s in r1.sites] == [s.keep for s in r2.sites]


def test_per_site_keep_and_layer_restriction(conv_net, images):
    result = prune(conv_net, images, PruneConfig(method="seq", keep={"fc1": 0.25, "conv2": 0.5}, progress=False))
    assert [(s.name, s.kept) for s in result.sites] == [("conv2", 4), ("fc1", 5)]
    assert result.model.conv1.out_channels == 6 and result.model.fc2.out_features == 12
    assert result.unselected == ["conv1", "fc2"]
    result = prune(conv_net, images, PruneConfig(method="layer", keep=0.5, layers=("fc2",), progress=False))
    assert [s.name for s in result.sites] == ["fc2"]
    assert result.unselected == ["conv1", "conv2", "fc1"]
