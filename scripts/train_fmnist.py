"""Train a Fashion-MNIST classifier of the model registry and save it to subprune/checkpoints/.

Seeded and deterministic: Adam (lr 2e-3, cosine decay to 0 over all steps),
batch 128, on the 60,000 Fashion-MNIST training images with random horizontal
flips; prints the training loss per epoch and the test accuracy at the end, then
writes ``subprune/checkpoints/<model>.safetensors`` atomically (temporary file in
the same directory, then :func:`os.replace`). Inputs are images in [0, 1], no
normalisation. One CPU thread by default (faster than two on a shared machine).
Usage::

    python scripts/train_fmnist.py --model {vgg11-bn-fmnist,resnet-fmnist} [--epochs E] [--seed 0] [--out PATH]

with ``subprune`` installed (``make`` installs it) or ``PYTHONPATH=.`` from the
repository root; Fashion-MNIST must be installed (``make fashion-mnist``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from train_lenet import save_atomically  # scripts/ is on sys.path when this script runs

from subprune.data import load_fashion_mnist
from subprune.evaluate import accuracy, count_parameters
from subprune.models.fmnist import FMNIST_ARCHITECTURES, checkpoint_path

DEFAULT_EPOCHS = {"vgg11-bn-fmnist": 5, "resnet-fmnist": 4}
"""Epochs that fit in 5 (VGG) and 13 (ResNet) minutes on one core of the development machine."""


def train(name: str, epochs: int, seed: int, batch_size: int = 128, lr: float = 2e-3) -> nn.Module:
    """Train the architecture ``name`` from seed ``seed``; print loss per epoch and the test accuracy."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    train_images, train_labels = load_fashion_mnist("train")  # (60000, 1, 28, 28), (60000,)
    test_images, test_labels = load_fashion_mnist("test")  # (10000, 1, 28, 28), (10000,)
    model = FMNIST_ARCHITECTURES[name]()
    print(f"{name}: {count_parameters(model)} parameters, {epochs} epoch(s)", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = train_images.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        total = 0.0
        for first in range(0, n, batch_size):
            batch = order[first : first + batch_size]
            images = train_images[batch]
            images = torch.where(flips[batch, None, None, None], images.flip(3), images)
            loss = F.cross_entropy(model(images), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * batch.numel()
        print(f"epoch {epoch}: mean training loss {total / n:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    model.eval()
    print(f"test accuracy {accuracy(model, test_images, test_labels):.4f}", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(FMNIST_ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=None, help="default: 5 for VGG, 4 for the ResNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="default: subprune/checkpoints/<model>.safetensors")
    args = parser.parse_args()
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.model, args.epochs or DEFAULT_EPOCHS[args.model], args.seed)
    out = args.out or checkpoint_path(args.model)
    save_atomically(model, out, {"model": args.model, "dataset": "fashion-mnist"})
    print(f"saved {out} after {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
