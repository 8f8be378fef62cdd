"""Fashion-MNIST classifiers trained here by ``scripts/train_fmnist.py``.

Two architectures from :mod:`subprune.models.cnn`, sized to train in at most about
fifteen minutes on one CPU core:

- ``vgg11-bn-fmnist``: VGG11 with BatchNorm (configuration "A" of Simonyan &
  Zisserman 2015) at a quarter of the width (16-32-64-64-128-128-128-128), three
  max-pools instead of five (28 -> 14 -> 7 -> 3), then Linear(128*3*3, 256) -> ReLU
  -> Linear(256, 10).
- ``resnet-fmnist``: CIFAR ResNet-20 (He et al. 2016, Sec. 4.2; three stages of
  three basic blocks, widths 16-32-64) with option-B (1x1 conv + BN) shortcuts,
  so that the coupled residual mode can prune the block outputs too.

Both take (N, 1, 28, 28) images in [0, 1] without normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from subprune.models.cnn import VGG, CifarResNet

__all__ = ["FMNIST_ARCHITECTURES", "FMNIST_VGG11_CONFIG", "checkpoint_path", "fmnist_weights"]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"

FMNIST_VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, 512, 512)
"""VGG11 for 28x28 inputs: the last two of its five max-pools are dropped (the features end at 3x3)."""


def vgg11_bn_fmnist() -> VGG:
    """VGG11-BN for Fashion-MNIST, widths / 4, 875,258 parameters."""
    return VGG(FMNIST_VGG11_CONFIG, width_divisor=4, in_channels=1, hidden=256, pool=3)


def resnet_fmnist() -> CifarResNet:
    """CIFAR ResNet-20 for Fashion-MNIST, widths 16-32-64, option-B shortcuts, 272,186 parameters."""
    return CifarResNet(n=3, widths=(16, 32, 64), shortcut="B", in_channels=1)


FMNIST_ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "vgg11-bn-fmnist": vgg11_bn_fmnist,
    "resnet-fmnist": resnet_fmnist,
}
"""Registry name -> builder of the architecture (fresh weights)."""


def checkpoint_path(name: str) -> Path:
    """``subprune/checkpoints/<name>.safetensors``, where ``scripts/train_fmnist.py`` writes model ``name``."""
    return CHECKPOINT_DIR / f"{name}.safetensors"


def fmnist_weights(name: str) -> Callable[[], dict[str, Tensor]]:
    """Return a loader of the trained state dict of ``name`` (a key of :data:`FMNIST_ARCHITECTURES`).

    The loader raises ``FileNotFoundError`` naming the training command if the
    checkpoint is missing.
    """

    def weights() -> dict[str, Tensor]:
        path = checkpoint_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"{name} checkpoint {path} not found; create it with "
                f"`python scripts/train_fmnist.py --model {name}`"
            )
        return load_file(path)

    weights.__doc__ = f"State dict of ``{name}`` trained on Fashion-MNIST by ``scripts/train_fmnist.py``."
    return weights
