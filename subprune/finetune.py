"""Fine-tune a pruned model with labels: the paper's optional step after pruning.

The paper reports top-1 accuracy without fine-tuning and, optionally, after
fine-tuning the pruned network with Adam (El Halabi et al., NeurIPS 2022, Sec. 5
and the appendix on the experimental set-up; docs/results.md, "The paper's protocol"): lr 1e-3 for 10
epochs on LeNet; 20 epochs with weight decay 5e-4 and the learning rate
multiplied by 0.1 at epochs 10 and 15 for the other models. "Limited data"
fine-tunes on the calibration images only (512), "full data" on the whole
training split. :func:`finetune` trains a deep copy of the pruned model, which
stays physically pruned (the sliced modules are trained as they are).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["FinetuneResult", "FinetuneSchedule", "NonFiniteLossError", "finetune", "paper_schedule"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite during fine-tuning."""


@dataclass(frozen=True)
class FinetuneSchedule:
    """Adam with step decay of the learning rate, validated once.

    Attributes
    ----------
    epochs : int
        Passes over the fine-tuning set, >= 1.
    lr : float
        Initial learning rate of Adam, > 0.
    weight_decay : float
        L2 penalty of Adam (``torch.optim.Adam(weight_decay=...)``), >= 0.
    milestones : tuple of int
        Epochs (0-based, strictly increasing, in 1..epochs-1) at whose start the
        learning rate is multiplied by ``gamma``.
    gamma : float
        Factor of each step, in (0, 1].
    batch_size : int
        Training samples per step, >= 1 (the last batch of an epoch may be smaller).
    """

    epochs: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    batch_size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs={self.epochs!r} must be an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma!r} must be in (0, 1]")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        milestones = tuple(self.milestones)
        if list(milestones) != sorted(set(milestones)) or any(not 0 < m < self.epochs for m in milestones):
            raise ValueError(f"milestones={milestones!r} must be strictly increasing epochs in 1..{self.epochs - 1}")
        object.__setattr__(self, "milestones", milestones)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): lr * gamma ** (milestones <= epoch)."""
        return self.lr * self.gamma ** sum(m <= epoch for m in self.milestones)


def paper_schedule(model_name: str) -> FinetuneSchedule:
    """The paper's fine-tuning schedule for a model (docs/results.md, "The paper's protocol").

    Parameters
    ----------
    model_name : str
        "lenet" gets Adam, lr 1e-3, 10 epochs; any other model 20 epochs with
        weight decay 5e-4 and the learning rate times 0.1 at epochs 10 and 15.
    """
    if model_name == "lenet":
        return FinetuneSchedule(epochs=10)
    return FinetuneSchedule(epochs=20, weight_decay=5e-4, milestones=(10, 15))


@dataclass
class FinetuneResult:
    """A fine-tuned model and its training curve.

    Attributes
    ----------
    model : nn.Module
        The fine-tuned copy, in eval mode.
    losses : list of float
        Mean cross-entropy over the training samples of each epoch.
    lrs : list of float
        Learning rate used in each epoch.
    """

    model: nn.Module
    losses: list[float]
    lrs: list[float]


def _check_data(images: Tensor, labels: Tensor | None) -> None:
    if labels is None:
        raise ValueError("fine-tuning needs labels: pass the class labels of the training images "
                         "(for limited data, those of the calibration images)")
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"images and labels must be Tensors, got {type(images).__name__} and "
                        f"{type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the {images.shape[0]} images: "
                         "give one class index per image")
    if images.shape[0] == 0:
        raise ValueError("cannot fine-tune on an empty set of images")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")


def finetune(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    schedule: FinetuneSchedule,
    *,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train a copy of ``model`` with cross-entropy, Adam and the step schedule.

    Parameters
    ----------
    model : nn.Module
        A (pruned) classifier returning logits of shape (batch, n_classes). Not
        modified: a deep copy is trained on the device of its first parameter.
    images : Tensor of shape (N, ...)
        Training inputs in dataset format (moved batch by batch to the device).
    labels : Tensor of shape (N,), integer
    schedule : FinetuneSchedule
        See :func:`paper_schedule`.
    preprocess : callable, optional
        Applied to each batch of ``images`` (for example
        :attr:`subprune.models.ModelSpec.preprocess`).
    seed : int
        Seed of the shuffling (and of dropout, through the global generator,
        which is restored afterwards).
    progress : bool
        Show a progress bar over epochs.

    Returns
    -------
    FinetuneResult
        The fine-tuned copy in eval mode (BatchNorm uses its updated running
        statistics), the mean loss and the learning rate of every epoch.

    Raises
    ------
    ValueError
        No labels, labels that do not match the images, an empty set, or a model
        without trainable parameters.
    NonFiniteLossError
        The loss became NaN or infinite (the message names the epoch).
    """
    _check_data(images, labels)
    work = copy.deepcopy(model)
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    device = params[0].device
    optimizer = torch.optim.Adam(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    losses, lrs = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        work.train()  # BatchNorm and dropout in training mode while fine-tuning
        bar = tqdm(range(schedule.epochs), desc="fine-tuning", disable=not progress, leave=False)
        for epoch in bar:
            lr = schedule.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(n, generator=generator)  # (N,)
            total = 0.0
            for start in range(0, n, schedule.batch_size):
                idx = order[start : start + schedule.batch_size]
                x = images[idx].to(device)
                if preprocess is not None:
                    x = preprocess(x)
                y = labels[idx].to(device)
                loss = F.cross_entropy(work(x), y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"fine-tuning loss is {float(loss.detach())} in epoch {epoch + 1} of "
                                             f"{schedule.epochs} (lr {lr:g}); lower the learning rate or check "
                                             "the inputs and labels")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * idx.numel()
            losses.append(total / n)
            lrs.append(lr)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    work.eval()
    return FinetuneResult(work, losses, lrs)
