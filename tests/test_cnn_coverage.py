"""Coverage of CNN block types: residual, depthwise, grouped, squeeze-and-excitation, concatenation.

Every architecture is a randomly initialised definition from subprune.models.cnn
(torchvision is not needed). For each, with and without coupled residual sites:
pruning without reweighting equals the dense model with the removed channels'
consumer columns zeroed (so producers, BatchNorms, grouped convs and every
consumer were cut at the right offsets), the pruned model is smaller, and at keep
ratio 1.0 the refit reproduces the dense outputs.
"""

import copy

import pytest
import torch
from torch import nn

from subprune.budgets import ParameterCounter
from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import PruneConfig, prune
from subprune.serialization import load_pruned, save_pruned
from subprune.shortcuts import ZeroPadShortcut
from subprune.sites import ChannelRange, find_sites, select_sites
from subprune.solver import greedy_select, refit, stack_problems
from subprune.surgery import consumer_weight_matrix, prune_model

N_CALIB = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(N_CALIB, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _masked(model: nn.Module, sites, reports) -> nn.Module:
    """The dense model with the consumer columns of every removed unit set to zero."""
    masked = copy.deepcopy(model)
    by_name = {s.name: s for s in sites}
    with torch.no_grad():
        for report in reports:
            site = by_name[report.name]
            dropped = sorted(set(range(site.channels)) - set(report.keep))
            for ref in site.consumers:
                w = consumer_weight_matrix(masked.get_submodule(ref.module))  # (d, m), a view of the weight
                width = ref.span // site.channels
                for unit in dropped:
                    first = (ref.start + unit * width) * ref.kernel
                    w[first : first + width * ref.kernel] = 0
    return masked


# coupled=True prunes the block-internal sites too; block-only runs of a few models keep the test fast.
CASES = [(arch, True) for arch in sorted(ARCHITECTURES)] + [
    (arch, False) for arch in ("efficientnet-se", "mobilenetv2", "resnet50")
]


@pytest.mark.parametrize(("arch", "coupled"), CASES)
def test_cut_equals_masked_dense_and_keep_one_reproduces(arch, coupled, inputs):
    model = ARCHITECTURES[arch](0)
    sites, skipped = find_sites(model, inputs[:2], coupled=coupled)
    assert sites, arch
    covered = {p.module for s in sites for p in s.producers} | {g for s in sites for g in s.groupwise}
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert covered | {s.name for s in skipped} == convs  # every layer is pruned or reported, never both
    assert not covered & {s.name for s in skipped}

    half = prune(model, inputs, PruneConfig(method="layer", keep=0.5, reweight=False, coupled=coupled, progress=False))
    pruned = half.model
    with torch.no_grad():
        out = pruned(inputs)
        torch.testing.assert_close(out, _masked(model, sites, half.sites)(inputs), atol=1e-4, rtol=1e-4)
    assert out.shape == (N_CALIB, 10)
    assert _params(pruned) < _params(model)
    removed = {}  # producer -> output channels removed, summed over its sites (option-A shortcuts split them)
    for report, site in zip(half.sites, sites, strict=True):
        assert report.kept == max(1, round(site.channels / 2))
        for ref in site.producers:
            cut = (site.channels - report.kept) * (ref.span // site.channels)
            removed[ref.module] = removed.get(ref.module, 0) + cut
    for name, count in removed.items():  # producers hold exactly the kept units
        assert _width(model.get_submodule(name)) - _width(pruned.get_submodule(name)) == count

    full = prune(model, inputs, PruneConfig(method="asym", keep=1.0, coupled=coupled, progress=False))
    with torch.no_grad():  # the refit reproduces the consumer inputs on the calibration set
        torch.testing.assert_close(full.model(inputs), model(inputs), atol=1e-4, rtol=1e-4)


def test_residual_streams_need_the_coupled_option(inputs):
    model = ARCHITECTURES["resnet18"](0)
    sites, skipped = find_sites(model, inputs[:2])
    reasons = {s.name: s.reason for s in skipped}
    assert "coupled=True" in reasons["conv1"] and "layer1.0.conv2" in reasons["conv1"]
    assert [s.name for s in sites] == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    sites, skipped = find_sites(model, inputs[:2], coupled=True)
    stream = {s.name: s for s in sites}["layer2.0.downsample.0"]
    assert [p.module for p in stream.producers] == ["layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"]
    assert [c.module for c in stream.consumers] == ["layer2.1.conv1", "layer3.0.downsample.0", "layer3.0.conv1"]
    assert stream.coupled and stream.group_size == 9 + 1 + 9
    result = prune(model, inputs, PruneConfig(method="seq", keep=0.5, coupled=True, progress=False))
    p = result.model
    assert (p.layer2[0].conv2.out_channels, p.layer2[0].downsample[1].num_features, p.layer2[1].bn2.num_features,
            p.layer3[0].conv1.in_channels, p.layer3[0].downsample[0].in_channels) == (16, 16, 16, 16, 16)
    assert p.fc.in_features == 64


def test_option_a_shortcuts_are_coupled(inputs):
    model = ARCHITECTURES["cifar-resnet20"](0)
    sites, skipped = find_sites(model, inputs[:2], coupled=True)
    assert [s.name for s in skipped] == ["fc"]
    stream = {s.name: s for s in sites if s.coupled}
    # stage 1's channels continue at 8..23 of stage 2 and 24..39 of stage 3; the zero channels are sites too
    assert [(n, s.channels) for n, s in stream.items()] == [
        ("conv1", 16), ("layers.3.conv2[0:8]", 8), ("layers.3.conv2[24:32]", 8),
        ("layers.6.conv2[0:16]", 16), ("layers.6.conv2[48:64]", 16)]
    ranges = {(p.module, p.start, p.span) for p in stream["conv1"].producers}
    assert {("layers.2.conv2", 0, 16), ("layers.3.conv2", 8, 16), ("layers.8.conv2", 24, 16)} <= ranges
    assert stream["conv1"].consumers[-1] == ChannelRange("fc", 24, 16)
    assert [(z.module, z.side, z.span) for z in stream["layers.3.conv2[24:32]"].zero_pads] == [
        ("layers.3.downsample", "back", 8)]
    assert ("layers.6.conv2", 40, 8) in {(p.module, p.start, p.span) for p in stream["layers.3.conv2[24:32]"].producers}

    chosen = select_sites(sites, skipped, ["layers.3.conv2"])  # a producer selects every site holding its channels
    assert [s.name for s in chosen] == ["conv1", "layers.3.conv2[0:8]", "layers.3.conv2[24:32]"]

    keep = {s.name: 0.5 for s in sites} | {"layers.3.conv2[0:8]": 0.25, "layers.6.conv2[48:64]": 1.0}
    half = prune(model, inputs, PruneConfig(method="layer", keep=keep, reweight=False, coupled=True, progress=False))
    pruned = half.model
    shortcuts = [(m.front, m.back) for m in (pruned.layers[3].downsample, pruned.layers[6].downsample)]
    assert shortcuts == [(2, 4), (8, 16)]
    assert (pruned.layers[3].conv2.out_channels, pruned.layers[6].conv2.out_channels, pruned.fc.in_features) == (
        2 + 8 + 4, 8 + 2 + 8 + 4 + 16, 8 + 2 + 8 + 4 + 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(inputs), _masked(model, sites, half.sites)(inputs), atol=1e-4, rtol=1e-4)
    assert _params(pruned) < _params(model) / 3
    asym = prune(model, inputs, PruneConfig(method="asym", keep=0.5, coupled=True, progress=False))
    assert (asym.model.layers[6].downsample.front, asym.model.layers[6].downsample.back) == (8, 8)
    assert _params(asym.model) < _params(model) / 3


def test_inline_channel_pad_is_reported_and_zero_pad_splits_a_producer():
    class Inline(nn.Module):  # option A written with F.pad: the pad amounts cannot be rebuilt
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, 2, 1), nn.Linear(8, 2)

        def forward(self, x):
            x = torch.relu(self.a(x))
            y = self.b(x) + nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    _, skipped = find_sites(Inline(), torch.randn(2, 3, 8, 8), coupled=True)
    reasons = {s.name: s.reason for s in skipped}
    assert "ZeroPadShortcut" in reasons["a"] and "zero-pads the channel dimension" in reasons["b"]

    class Wide(nn.Module):  # the wide producer comes first: its channels are split at the shortcut's zeros
        def __init__(self):
            super().__init__()
            self.b, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.pad, self.c, self.head = ZeroPadShortcut(1, 3, 1), nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 2)

        def forward(self, x):
            y = torch.relu(self.b(x) + self.pad(torch.relu(self.a(x))))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.c(y)), 1), 1))

    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(16, 3, 8, 8)
    sites, skipped = find_sites(model, x[:2], coupled=True)
    assert [(s.name, s.channels) for s in sites] == [("b[0:3]", 3), ("b[3:7]", 4), ("b[7:8]", 1), ("c", 6)]
    assert [p.module for p in sites[1].producers] == ["b", "a"] and not sites[1].zero_pads
    half = prune(model, x, PruneConfig(method="seq", keep=0.5, reweight=False, coupled=True, progress=False))
    assert (half.model.pad.front, half.model.pad.back, half.model.a.out_channels, half.model.b.out_channels) == (
        2, 1, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(half.model(x), _masked(model, sites, half.sites)(x), atol=1e-5, rtol=1e-5)
    _, skipped = find_sites(model, x[:2])
    assert "coupled=True" in {s.name: s.reason for s in skipped}["b"]


def test_depthwise_se_grouped_and_concatenation_sites(inputs):
    sites, _ = find_sites(ARCHITECTURES["efficientnet-se"](0), inputs[:2])
    se = {s.name: s for s in sites}["blocks.0.expand.0"]
    assert se.groupwise == ("blocks.0.depthwise.0",)
    assert [p.module for p in se.producers] == ["blocks.0.expand.0", "blocks.0.se.expand"]  # the SE gate
    assert [c.module for c in se.consumers] == ["blocks.0.se.reduce", "blocks.0.project.0"]
    sites, _ = find_sites(ARCHITECTURES["resnext"](0), inputs[:2])
    grouped = {s.name: s for s in sites}["layer2.0.conv1"]  # 16 channels in 4 groups of the 3x3 conv
    assert (grouped.channels, grouped.groupwise, grouped.consumers[0].span) == (4, ("layer2.0.conv2",), 16)
    sites, _ = find_sites(ARCHITECTURES["inception"](0), inputs[:2])
    by = {s.name: s for s in sites}
    assert [(c.module, c.start, c.span) for c in by["b2b"].consumers] == [("mix", 8, 16)]
    assert [c.module for c in by["stem.0"].consumers] == ["b1", "b2a", "b3"]
    result = prune(ARCHITECTURES["resnext"](0), inputs, PruneConfig(method="seq", keep=0.5, progress=False))
    conv = result.model.layer2[0].conv2
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 8, 8)


def test_stacked_objective_is_the_sum_over_consumers():
    gen = torch.Generator().manual_seed(0)
    n, group_sizes = 5, [2, 3]
    bs = [torch.randn(40, n * g, generator=gen, dtype=torch.float64) for g in group_sizes]
    ws = [torch.randn(n * g, m, generator=gen, dtype=torch.float64) for g, m in zip(group_sizes, [3, 4], strict=True)]
    grams = [b.T @ b for b in bs]
    gram, weight, cross, g = stack_problems(grams, ws, group_sizes)
    assert cross is None and g == 5 and gram.shape == (25, 25) and weight.shape == (25, 7)
    energy = sum(float(((b @ w) ** 2).sum()) for b, w in zip(bs, ws, strict=True))
    result = greedy_select(gram, weight, energy, g, n)
    for k in range(1, n + 1):
        keep = result.keep(k)
        kept = 0.0
        for b, w, gj, gram_j in zip(bs, ws, group_sizes, grams, strict=True):
            cols = (keep.unsqueeze(1) * gj + torch.arange(gj)).reshape(-1)
            residual = b[:, cols] @ refit(gram_j, w, keep, gj) - b @ w
            kept += float(((b @ w) ** 2).sum() - (residual**2).sum())
        assert float(result.objective[k - 1]) * energy == pytest.approx(kept, rel=1e-9)


@pytest.mark.parametrize("arch", ["resnext", "efficientnet-se", "cifar-resnet20"])
def test_pruned_grouped_and_depthwise_models_save_and_reload(arch, inputs, tmp_path):
    result = prune(ARCHITECTURES[arch](0), inputs, PruneConfig(method="layer", keep=0.5, coupled=True, progress=False))
    save_pruned(result.model, tmp_path / "run")
    reloaded = load_pruned(tmp_path / "run", model=ARCHITECTURES[arch](1))  # another dense instance
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs), result.model(inputs))


def test_a_layer_that_reads_and_writes_the_residual_stream():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + self.b(h))

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(64, 6)
    (site,), _ = find_sites(model, x[:2], coupled=True)
    assert [p.module for p in site.producers] == ["a", "b"] and [c.module for c in site.consumers] == ["b", "c"]
    half = prune(model, x, PruneConfig(method="seq", keep=0.5, reweight=False, coupled=True, progress=False))
    assert (half.model.b.in_features, half.model.b.out_features, half.model.c.in_features) == (4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(half.model(x), _masked(model, [site], half.sites)(x))
    full = prune(model, x, PruneConfig(method="asym", keep=1.0, coupled=True, progress=False))
    with torch.no_grad():
        torch.testing.assert_close(full.model(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_style_squeeze_excitation_and_stochastic_depth():
    class StochasticDepth(nn.Module):  # torchvision.ops.StochasticDepth in eval mode
        def forward(self, x):
            return x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.expand = nn.Conv2d(8, 16, 1)
            self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
            self.gate = nn.Hardsigmoid()
            self.project, self.drop = nn.Conv2d(16, 8, 1), StochasticDepth()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            h = torch.relu(self.expand(x))
            scale = self.gate(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(h, 1)))))
            y = x + self.drop(self.project(scale * h))  # the gate is the first operand here
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    sites, skipped = find_sites(Block(), torch.randn(2, 3, 8, 8), coupled=True)
    by = {s.name: s for s in sites}
    assert [p.module for p in by["expand"].producers] == ["expand", "fc2"]
    assert [c.module for c in by["expand"].consumers] == ["fc1", "project"]
    assert [p.module for p in by["stem"].producers] == ["stem", "project"] and by["stem"].coupled
    assert [s.name for s in skipped] == ["head"]


@pytest.mark.parametrize("coupled", [False, True])
def test_parameter_counter_is_exact_for_every_architecture(coupled, inputs):
    for arch in sorted(ARCHITECTURES):
        model = ARCHITECTURES[arch](0)
        sites, _ = find_sites(model, inputs[:2], coupled=coupled)
        counter = ParameterCounter(model, sites)
        kept = {s.name: max(1, (s.channels * (1 + i % 3)) // 4) for i, s in enumerate(sites)}
        pruned = prune_model(model, sites, {name: torch.arange(k) for name, k in kept.items()})
        assert counter.count(kept) == _params(pruned), arch
        assert counter.count({}) == _params(model), arch
