"""Measure a model: top-1 accuracy, parameter count, FLOPs and CPU latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from subprune.calibration import Batch, as_calibration, forward
from subprune.devices import eval_mode

__all__ = ["accuracy", "compare_outputs", "count_flops", "count_parameters", "measure_latency"]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and gradient-free; restore its training flags after."""
    with eval_mode(model), torch.no_grad():
        yield model


def accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 1000,
) -> float:
    """Top-1 accuracy of ``model`` on a labelled set, in eval mode and without gradients.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape (batch, n_classes). Its training flags
        (of every submodule) are restored on return.
    images : Tensor of shape (N, ...)
        Inputs, moved batch by batch to the device of the model's first parameter.
    labels : Tensor of shape (N,), int64
    preprocess : callable, optional
        Applied to each batch of ``images`` before the model (for example
        :attr:`subprune.models.ModelSpec.preprocess`).
    batch_size : int, default 1000

    Returns
    -------
    float
        Fraction of correct predictions, in [0, 1].

    Raises
    ------
    ValueError
        If ``images`` and ``labels`` differ in length, are empty, or ``batch_size < 1``.
    """
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {n} images")
    if n == 0:
        raise ValueError("cannot compute the accuracy of an empty set")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters(), torch.empty(0)).device
    correct = 0
    with _eval_mode(model):
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device)
            if preprocess is not None:
                x = preprocess(x)
            predicted = model(x).argmax(dim=1).cpu()  # (batch,)
            correct += int((predicted == labels[start : start + batch_size]).sum())
    return correct / n


def count_parameters(model: nn.Module) -> int:
    """Total number of elements of all parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _flop_hooks(model: nn.Module, counts: list[int]) -> Iterator[None]:
    """Append, for each Conv2d/Linear call, its FLOPs per sample to ``counts``."""

    def conv_hook(module: nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Every output element of one sample needs (c_in / groups) * kh * kw MACs.
        out_elements = output[0].numel()  # c_out * h_out * w_out
        kh, kw = module.kernel_size
        macs = out_elements * (module.in_channels // module.groups) * kh * kw
        counts.append(2 * macs)

    def linear_hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # One sample may carry extra leading dims (tokens): count every row of it.
        rows = output[0].numel() // module.out_features
        counts.append(2 * rows * module.in_features * module.out_features)

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_flops(model: nn.Module, example_input: Tensor | Batch) -> int:
    """FLOPs of one forward pass for ONE sample, counting Conv2d and Linear layers only.

    A multiply-accumulate counts as 2 FLOPs; biases, activations, pooling,
    normalisation and every other operation are ignored. Grouped (and depthwise)
    convolutions count ``c_in / groups`` inputs per output element.

    Parameters
    ----------
    model : nn.Module
    example_input : Tensor of shape (batch, ...), or a :class:`subprune.calibration.Batch`
        Any batch of valid inputs; only the first sample of each layer's output is
        counted, so the result does not depend on ``batch``.

    Returns
    -------
    int
        ``2 * MACs`` summed over every call of every Conv2d and Linear module.
    """
    counts: list[int] = []
    with _flop_hooks(model, counts), _eval_mode(model):
        forward(model, example_input)
    return sum(counts)


def measure_latency(
    model: nn.Module, example_batch: Tensor | Batch, repeats: int = 30, warmup: int = 5
) -> float:
    """Median wall-clock seconds of one forward pass of ``example_batch``.

    Runs in eval mode without gradients on the model's current device (meant for
    the CPU: no device synchronisation is done), timed with
    :func:`time.perf_counter`. The training flags are restored on return.

    Parameters
    ----------
    model : nn.Module
    example_batch : Tensor of shape (batch, ...), or a :class:`subprune.calibration.Batch`
    repeats : int, default 30
        Number of timed forward passes.
    warmup : int, default 5
        Untimed passes run first.

    Returns
    -------
    float
        Median seconds per forward pass of the whole batch.

    Raises
    ------
    ValueError
        If ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    times = []
    with _eval_mode(model):
        for _ in range(warmup):
            forward(model, example_batch)
        for _ in range(repeats):
            start = time.perf_counter()
            forward(model, example_batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _logits(output) -> Tensor:
    """The Tensor of a model output (a Tensor, the first of a tuple, or ``.logits``)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot compare model outputs of type {type(output).__name__}; return a Tensor")


def compare_outputs(dense: nn.Module, pruned: nn.Module, data, labels: Tensor | None = None,
                    batch_size: int = 256) -> dict:
    """How closely ``pruned`` follows ``dense`` on ``data`` (and both accuracies when labels are known).

    Parameters
    ----------
    dense, pruned : nn.Module
        Models returning outputs of shape (batch, n_outputs) (or (batch, ..., n_outputs)).
    data : Tensor of shape (N, ...), or any form :func:`subprune.calibration.as_calibration` takes
    labels : Tensor of shape (N,), optional
        Class labels (overriding labels the batches carry).
    batch_size : int

    Returns
    -------
    dict
        ``relative_error``: ||f_pruned - f_dense||_F / ||f_dense||_F over all
        outputs; ``agreement``: share of samples whose argmax over the last
        dimension agrees; ``samples``; with labels also ``dense_accuracy`` and
        ``pruned_accuracy`` (fractions).
    """
    data = as_calibration(data, dense, labels=labels, batch_size=batch_size)
    error = norm = agree = correct_dense = correct_pruned = 0.0
    count = 0
    device = next(dense.parameters()).device
    with _eval_mode(dense), _eval_mode(pruned):
        for batch in data.batches(batch_size, device):
            a, b = _logits(batch.run(dense)).double(), _logits(batch.run(pruned)).double()
            error += float((b - a).square().sum())
            norm += float(a.square().sum())
            top_a, top_b = a.argmax(dim=-1), b.argmax(dim=-1)
            agree += float((top_a == top_b).double().mean()) * len(batch)
            if batch.labels is not None:
                correct_dense += float((top_a == batch.labels).sum())
                correct_pruned += float((top_b == batch.labels).sum())
            count += len(batch)
    out = {"samples": count, "relative_error": (error / norm) ** 0.5 if norm > 0 else 0.0,
           "agreement": agree / count}
    if data.labels is not None:
        out.update(dense_accuracy=correct_dense / count, pruned_accuracy=correct_pruned / count)
    return out
