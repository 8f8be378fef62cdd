"""benchmarks/zoo_coverage.py without timm: ``excite`` makes the cut-vs-masked check carry signal."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from subprune.sites import find_sites
from subprune.surgery import prune_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("zoo_coverage", BENCHMARKS / "zoo_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Branch(nn.Module):
    """x + bn2(conv2(relu(conv1(x)))) with bn2's scale zero, as timm's ``zero_init_last`` leaves it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.conv1(x))))


def test_excite_gives_a_zero_initialised_branch_signal_so_cut_equals_masked_is_not_vacuous():
    zoo = _load()
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for excited in (False, True):
        model = Branch().eval()
        if excited:
            zoo.excite(model, torch.Generator().manual_seed(2))
            assert (model.bn2.weight >= 0.5).all() and (model.bn2.running_var >= 0.5).all()
        sites, _ = find_sites(model, x)
        (site,) = [s for s in sites if s.producers[0].module == "conv1"]
        keep = {site.name: torch.arange(0, site.channels, 2)}
        with torch.no_grad():
            dense, masked = model(x), zoo.masked(model, [site], keep)(x)
            cut = prune_model(model, [site], keep)(x)
        change = float((masked - dense).abs().max())
        assert change > 1e-2 if excited else change == 0.0  # zero-init: whatever is cut, nothing changes
        assert torch.allclose(cut, masked, atol=1e-5)


def test_skip_patterns_are_grouped_across_nodes_and_low_coverage_architectures_listed():
    zoo = _load()
    assert zoo.pattern("its channels reach 'cat_12' (cat) at two different positions") == (
        "its channels reach 'cat' (cat) at two different positions")
    assert zoo.pattern("'layer_norm_3' (layer_norm) normalises") == "'layer_norm' (layer_norm) normalises"
    assert zoo.pattern("ScaledStdConv2d 'stages.0.0.conv1' is a Conv2d subclass") == (
        "ScaledStdConv2d '...' is a Conv2d subclass")
    assert zoo.pattern("grouped convolutions or GroupNorms with 120 groups do not divide its 60 channels evenly") == (
        "grouped convolutions or GroupNorms with G groups do not divide its C channels evenly")
    rows = [
        {"arch": "a", "layers": 10, "in_sites": 2, "share": 0.2, "skipped_reasons": [
            "its channels reach 'cat' (cat) at two different positions",
            "its channels reach 'cat_1' (cat) at two different positions",
            "grouped or depthwise convolution whose channels no site carries",
            "its outputs are the model's outputs (last layer)"]},
        {"arch": "b", "layers": 4, "in_sites": 3, "share": 0.75, "skipped_reasons": [
            "its channels reach 'cat_7' (cat) at two different positions"]},
        {"arch": "c", "fatal": "RuntimeError: x"},
    ]
    text = zoo.patterns_section(rows)
    assert "| a | 2 of 10 (20%) | grouped or depthwise convolution whose channels no site carries<br>its channels " \
        "reach 'cat' (cat) at two different positions |" in text
    assert "| b |" not in text.split("## Every pattern")[0]
    assert "| its channels reach 'cat' (cat) at two different positions | a (2), b (1) |" in text
    assert "| grouped or depthwise convolution whose channels no site carries | a |" in text
    assert "last layer" not in text
