"""Train the paper's LeNet on MNIST and save it to subprune/checkpoints/.

Seeded and deterministic: Adam (lr 1e-3), batch 128, on the first 50,000 MNIST
training images; prints the test accuracy after every epoch, then writes
``subprune/checkpoints/lenet_mnist.safetensors`` atomically (temporary file in the
same directory, then :func:`os.replace`). Inputs are images in [0, 1], no
normalisation. Usage::

    python scripts/train_lenet.py [--epochs 10] [--seed 0] [--out PATH]

with ``subprune`` installed (``make`` installs it) or ``PYTHONPATH=.`` from the
repository root.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from subprune.data import load_mnist
from subprune.evaluate import accuracy
from subprune.models import LENET_CHECKPOINT, LeNet


def train(epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> LeNet:
    """Train a :class:`LeNet` from seed ``seed``; print test accuracy per epoch."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    train_images, train_labels = load_mnist("train")  # (50000, 1, 28, 28), (50000,)
    test_images, test_labels = load_mnist("test")  # (10000, 1, 28, 28), (10000,)
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = train_images.shape[0]
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, batch_size):
            batch = order[first : first + batch_size]
            loss = F.cross_entropy(model(train_images[batch]), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        test_acc = accuracy(model, test_images, test_labels)
        seconds = time.perf_counter() - start
        print(
            f"epoch {epoch}: last loss {loss.item():.4f}, test accuracy {test_acc:.4f} "
            f"({seconds:.1f} s)",
            flush=True,
        )
    return model.eval()


def save_atomically(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model's state dict as safetensors to ``path`` via a temporary file (also used by train_fmnist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata or {"model": "LeNet", "dataset": "mnist"})
        os.chmod(tmp, 0o644)  # mkstemp creates the file as 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=LENET_CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.epochs, args.seed)
    save_atomically(model, args.out)
    print(f"saved {args.out} after {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
