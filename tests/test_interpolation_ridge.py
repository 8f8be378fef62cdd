"""PruneConfig.interpolation_ridge: a ridge only at the sites whose refit would interpolate the calibration set."""

import pytest
import torch
from torch import nn

from subprune.pipeline import PruneConfig, prune


class _Net(nn.Module):
    """conv1 -> conv2 (many patch rows per sample) -> flatten -> fc (one row per sample) -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3)
        self.fc, self.head = nn.Linear(6 * 4 * 4, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def test_ridge_only_where_rows_are_fewer_than_twice_the_kept_columns():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(24, 3, 8, 8)
    config = {"method": "layer", "keep": 0.5, "progress": False}
    auto = prune(model, x, PruneConfig(interpolation_ridge=0.1, **config))
    ridge = {r.name: r.ridge for r in auto.sites}
    # conv1 -> conv2: 24 * 36 patch rows for 2 * 9 kept columns; fc -> head: 24 rows for 2 columns: no ridge.
    # conv2 -> fc: 24 rows for 3 * 16 = 48 kept columns: the refit would interpolate, so the ridge is on.
    assert ridge["conv1"] == 0 and ridge["fc"] == 0 and ridge["conv2"] > 0
    plain = prune(model, x, PruneConfig(**config))
    everywhere = prune(model, x, PruneConfig(ridge=0.1, **config))
    assert {r.name: r.ridge for r in everywhere.sites}["conv2"] == pytest.approx(ridge["conv2"])
    # layer-wise statistics come from the dense model: each site equals the run with its own ridge
    torch.testing.assert_close(auto.model.fc.weight, everywhere.model.fc.weight)
    torch.testing.assert_close(auto.model.head.weight, plain.model.head.weight)
    assert not torch.allclose(auto.model.fc.weight, plain.model.fc.weight)
    with pytest.raises(ValueError, match="interpolation_ridge"):
        PruneConfig(interpolation_ridge=-1.0)


def test_cli_flag_sets_it(tmp_path, capsys):
    import json

    from subprune.cli import main

    # LeNet, 128 calibration images, keep 0.5: conv2's consumer fc1 gets 8 x 25 = 200 columns (< 2 x 128 rows)
    code = main(["prune", "--model", "lenet", "--method", "layer", "--keep", "0.5", "--calib", "128",
                 "--interpolation-ridge", "0.1", "--out", str(tmp_path / "run"), "--quiet", "--json"])
    assert code == 0
    ridge = {s["name"]: s["ridge"] for s in json.loads(capsys.readouterr().out)["sites"]}
    assert ridge["conv2"] > 0 and ridge["conv1"] == 0 and ridge["fc2"] == 0
