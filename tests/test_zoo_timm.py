"""A few real timm architectures (random weights), through benchmarks/zoo_coverage.py's checks.

Skipped without timm (``make zoo-extras``). Each: most layers in sites, the
keep-1.0 cut reproduces the dense output, the keep-0.5 cut runs and equals the
masked dense model, and Torch-Pruning (if installed) is run side by side.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("timm") is None:  # importorskip would import it, which needs the placeholder
    pytest.skip("timm is not installed (make zoo-extras)", allow_module_level=True)

spec = importlib.util.spec_from_file_location("zoo_coverage",
                                              Path(__file__).parents[1] / "benchmarks" / "zoo_coverage.py")
zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo)


@pytest.mark.parametrize(("name", "size", "share"), [
    ("resnet18", 32, 0.95), ("efficientnet_lite0", 32, 0.98), ("tf_efficientnet_b0", 32, 0.98),
    ("vit_tiny_patch16_224", 32, 0.98), ("convnext_atto", 32, 0.97),
    ("nf_resnet26:frozen", 32, 0.96),  # ScaledStdConv2d frozen to plain convolutions (subprune.convs)
])
def test_timm_architecture(name, size, share):
    torch.set_num_threads(1)
    model = zoo.build(zoo.import_timm(), name, size)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    row = zoo.subprune_row(model, x)
    assert row["share"] >= share
    assert row["keep1_max_diff"] == 0
    assert row["runs"] and row["params_ratio"] > 2.5
    assert row["cut_vs_masked"] < 1e-4
