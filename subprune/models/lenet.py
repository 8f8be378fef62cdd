"""The LeNet of the paper's MNIST experiments (El Halabi et al., NeurIPS 2022, Sec. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """LeNet for 28x28 grey images: conv 1->6->16 (3x3), fc 400->120->84->10.

    Spatial sizes: 28 -conv3-> 26 -pool2-> 13 -conv3-> 11 -pool2-> 5, so the first
    fully connected layer reads 16 * 5 * 5 = 400 features. The forward has no
    shape-dependent Python control flow and uses functional ReLU and
    max-pooling (no shared activation modules), so :func:`torch.fx.symbolic_trace` works.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=3)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, 1, 28, 28) to logits (N, num_classes)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)  # (N, 400)
        x = F.relu(self.fc1(x))  # (N, 120)
        x = F.relu(self.fc2(x))  # (N, 84)
        return self.fc3(x)  # (N, num_classes)
