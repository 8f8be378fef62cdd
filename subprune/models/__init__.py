"""Model definitions and a registry of pretrained MNIST and Fashion-MNIST classifiers.

Each entry of :data:`MODELS` is a :class:`ModelSpec` that says how to build the
architecture, where its weights come from, and how to turn dataset images in
[0, 1] into the input the weights expect. :func:`load_model` returns the model
ready for evaluation or pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from subprune.models.fmnist import FMNIST_ARCHITECTURES, fmnist_weights
from subprune.models.lenet import LeNet
from subprune.models.third_party import (
    AdvertorchLeNet5,
    CcexamMNISTNet,
    advertorch_lenet5_weights,
    ccexam_mnistnet_weights,
    ccexam_normalize,
)

__all__ = [
    "LENET_CHECKPOINT",
    "MODELS",
    "AdvertorchLeNet5",
    "CcexamMNISTNet",
    "LeNet",
    "ModelSpec",
    "get_spec",
    "identity",
    "lenet_weights",
    "load_model",
]

LENET_CHECKPOINT = (
    Path(__file__).resolve().parent.parent / "checkpoints" / "lenet_mnist.safetensors"
)


def identity(images: Tensor) -> Tensor:
    """Return ``images`` unchanged (for models that take images in [0, 1])."""
    return images


def lenet_weights() -> dict[str, Tensor]:
    """State dict of :class:`LeNet` trained on MNIST by ``scripts/train_lenet.py``.

    Raises
    ------
    FileNotFoundError
        If ``subprune/checkpoints/lenet_mnist.safetensors`` does not exist.
    """
    if not LENET_CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"LeNet checkpoint {LENET_CHECKPOINT} not found; create it with "
            "`python scripts/train_lenet.py`"
        )
    return load_file(LENET_CHECKPOINT)


@dataclass(frozen=True)
class ModelSpec:
    """How to build, load and feed one pretrained model.

    Attributes
    ----------
    name : str
        Registry key.
    dataset : str
        Name of the dataset in :data:`subprune.data.DATASETS` the model was trained on.
    build : Callable[[], nn.Module]
        Builds the architecture with freshly initialised weights.
    weights : Callable[[], dict[str, Tensor]]
        Reads the pretrained state dict (CPU tensors).
    preprocess : Callable[[Tensor], Tensor]
        Maps dataset images (N, 1, 28, 28) in [0, 1] to the model's input (same shape).
    description : str
        One line for listings.
    """

    name: str
    dataset: str
    build: Callable[[], nn.Module]
    weights: Callable[[], dict[str, Tensor]]
    preprocess: Callable[[Tensor], Tensor]
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="lenet",
            dataset="mnist",
            build=LeNet,
            weights=lenet_weights,
            preprocess=identity,
            description="the paper's LeNet (conv 6-16, fc 120-84-10), trained here",
        ),
        ModelSpec(
            name="advertorch-lenet5",
            dataset="mnist",
            build=AdvertorchLeNet5,
            weights=advertorch_lenet5_weights,
            preprocess=identity,
            description="advertorch LeNet5Madry (conv 32-64, fc 200-10), clean training",
        ),
        ModelSpec(
            name="ccexam-mnistnet",
            dataset="mnist",
            build=CcexamMNISTNet,
            weights=ccexam_mnistnet_weights,
            preprocess=ccexam_normalize,
            description="ccexam MNISTNet (conv 32-64, fc 128-10), normalised inputs",
        ),
        ModelSpec(
            name="vgg11-bn-fmnist",
            dataset="fashion-mnist",
            build=FMNIST_ARCHITECTURES["vgg11-bn-fmnist"],
            weights=fmnist_weights("vgg11-bn-fmnist"),
            preprocess=identity,
            description="VGG11-BN at width / 4 (conv 16-...-128, fc 256-10), 3 pools, trained here",
        ),
        ModelSpec(
            name="resnet-fmnist",
            dataset="fashion-mnist",
            build=FMNIST_ARCHITECTURES["resnet-fmnist"],
            weights=fmnist_weights("resnet-fmnist"),
            preprocess=identity,
            description="CIFAR ResNet-20 (widths 16-32-64, option-B shortcuts), trained here",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` registered as ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`MODELS`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def load_model(name: str) -> nn.Module:
    """Build the model registered as ``name``, load its weights strictly, set eval mode.

    Returns
    -------
    nn.Module
        On the CPU, float32, in eval mode. Feed it ``get_spec(name).preprocess(images)``.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`MODELS`.
    FileNotFoundError
        If the weights (or the package that ships them) are missing.
    RuntimeError
        If the state dict does not match the architecture.
    """
    spec = get_spec(name)
    model = spec.build()
    model.load_state_dict(spec.weights(), strict=True)
    return model.eval()
