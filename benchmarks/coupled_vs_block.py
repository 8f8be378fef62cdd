"""Block-internal against coupled residual pruning of a trained ResNet, accuracy vs compression.

With ``--model NAME`` prunes a registered pretrained ResNet (e.g. ``resnet-fmnist``) on its
own dataset. Otherwise trains (seeded; or reloads with ``--checkpoint``) a CIFAR-style ResNet with
option-B shortcuts (1x1 conv + BN) on ``--dataset`` (Fashion-MNIST needs the
Debian package ``dataset-fashion-mnist``; MNIST works everywhere), then prunes it with
AsymInChange and reweighting on ``--calib`` training images (no labels, no
fine-tuning) at several uniform keep ratios, once with block-internal sites only
and once with coupled residual sites too, and prints test accuracy against the
whole-network compression ratio (dense / pruned parameters), one markdown table.

    python benchmarks/coupled_vs_block.py --dataset mnist --width 8 --train-samples 20000 --epochs 1
    python benchmarks/coupled_vs_block.py --model resnet-fmnist --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from subprune.data import calibration_indices, load_dataset
from subprune.evaluate import accuracy, count_parameters
from subprune.models import MODELS, get_spec, identity, load_model
from subprune.models.cnn import CifarResNet
from subprune.pipeline import PruneConfig, prune


def build(n: int, width: int) -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(n=n, widths=(width, 2 * width, 4 * width), shortcut="B", in_channels=1)


def train(model: CifarResNet, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for i, start in enumerate(range(0, x.shape[0], 128)):
            idx = order[start : start + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 100 == 0:
                print(f"epoch {epoch} step {i} loss {loss.item():.3f}", flush=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="prune this registered model on its dataset instead of training one")
    parser.add_argument("--blocks", type=int, default=1, help="basic blocks per stage (ResNet-(6n+2))")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (then x2, x4)")
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N training images")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.35, 0.25])
    parser.add_argument("--checkpoint", default=None, help="load the trained model here if present, else save it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preprocess = identity
    if args.model is not None:
        spec = get_spec(args.model)
        args.dataset, preprocess = spec.dataset, spec.preprocess
    train_x, train_y = load_dataset(args.dataset, "train")
    test_x, test_y = load_dataset(args.dataset, "test")
    if args.model is not None:
        model = load_model(args.model)
        description = f"{args.model} ({spec.description})"
    else:
        model = build(args.blocks, args.width)
        description = (f"ResNet-{6 * args.blocks + 2} (option-B shortcuts, widths {args.width}/{2 * args.width}/"
                       f"{4 * args.width}), {args.epochs} epoch(s)")
    if args.model is None and args.checkpoint and Path(args.checkpoint).exists():
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    elif args.model is None:
        start = time.perf_counter()
        n = args.train_samples or train_x.shape[0]
        train(model, train_x[:n], train_y[:n], args.epochs, args.seed)
        print(f"trained in {time.perf_counter() - start:.0f}s")
        if args.checkpoint:
            Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.checkpoint)
    model.eval()
    dense_acc, dense_params = accuracy(model, test_x, test_y, preprocess), count_parameters(model)
    calibration = preprocess(train_x[calibration_indices(train_x.shape[0], args.calib, args.seed)])
    rows = []
    for coupled in (False, True):
        for keep in args.keep:
            result = prune(model, calibration, PruneConfig(method="asym", keep=keep, coupled=coupled,
                                                           seed=args.seed, progress=False))
            acc = accuracy(result.model, test_x, test_y, preprocess)
            ratio = dense_params / count_parameters(result.model)
            rows.append((coupled, keep, len(result.sites), ratio, acc))
            print(f"coupled={coupled} keep={keep}: {len(result.sites)} sites, compression {ratio:.2f}x, "
                  f"accuracy {acc:.4f}", flush=True)
    print(f"\n{description} on {args.dataset}, "
          f"dense accuracy {dense_acc:.4f}, {dense_params} parameters; AsymInChange + reweighting, "
          f"{args.calib} calibration images, seed {args.seed}, no fine-tuning.\n")
    print("| sites | keep ratio | sites pruned | compression | test accuracy |")
    print("|---|---|---|---|---|")
    for coupled, keep, n_sites, ratio, acc in rows:
        print(f"| {'coupled' if coupled else 'block-internal'} | {keep} | {n_sites} | {ratio:.2f} | {acc:.4f} |")


if __name__ == "__main__":
    main()
