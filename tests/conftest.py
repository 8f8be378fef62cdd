"""Small models shared by the tests."""

import pytest
import torch
from torch import nn


class SmallConvNet(nn.Module):
    """LeNet-shaped: conv -> BN -> relu -> pool -> conv -> relu -> pool -> flatten -> fc -> fc -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 20)
        self.fc2 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)  # (N, 6, 6, 6)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (N, 8, 3, 3)
        x = torch.flatten(x, 1)  # (N, 72)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


def make_conv_net(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    model = SmallConvNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    return model.eval()


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()


@pytest.fixture
def conv_net():
    return make_conv_net()


@pytest.fixture
def images():
    return torch.randn(96, 1, 14, 14, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    convolutions run fastest that way on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
