"""The README's Python example runs as written, with a user's model file beside it."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"

MY_NET = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

g = torch.Generator().manual_seed(0)
my_dataset = TensorDataset(torch.randn(200, 1, 14, 14, generator=g), torch.randint(0, 3, (200,), generator=g))
'''


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "my_net.py").write_text(MY_NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    from my_net import MyNet

    torch.save(MyNet().state_dict(), tmp_path / "net.pt")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    pruned, result = scope["pruned"], scope["result"]
    assert pruned.conv.out_channels == 4 and pruned.fc1.out_features == 8
    x = torch.randn(5, 1, 14, 14)
    torch.testing.assert_close(pruned(x), result.model(x))
    assert "SiteReport" in capsys.readouterr().out


def test_readme_is_one_screen():
    assert len(README.read_text().splitlines()) <= 60
