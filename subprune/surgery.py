"""Physical surgery: rebuild producer, BatchNorm and consumer modules with fewer channels.

Surgery knows nothing of how channels were chosen: it takes a site, a sorted
``keep`` index tensor and optionally the refit consumer weight, and replaces
modules by smaller ones of the same type, dtype and device. It edits the model
it is given; :func:`prune_model` works on a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from subprune.sites import PruningSite
from subprune.solver import group_columns


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a dotted path); ValueError if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the model has no module named '{name}'") from exc


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (a dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_keep(keep: Tensor, n: int, what: str) -> Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    if keep.ndim != 1 or keep.numel() == 0:
        raise ValueError(f"{what}: keep must be a non-empty 1-D index tensor")
    if not bool((keep[1:] > keep[:-1]).all()):
        raise ValueError(f"{what}: keep must be sorted and free of duplicates")
    if int(keep[0]) < 0 or int(keep[-1]) >= n:
        raise ValueError(f"{what}: keep indices must lie in 0..{n - 1}")
    return keep


def module_config(module: nn.Module) -> dict:
    """Constructor arguments of a Linear, Conv2d or BatchNorm module (JSON-serialisable)."""
    if isinstance(module, nn.Linear):
        return dict(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
    if isinstance(module, nn.Conv2d):
        return dict(
            in_channels=module.in_channels, out_channels=module.out_channels,
            kernel_size=list(module.kernel_size), stride=list(module.stride), padding=_padding(module),
            dilation=list(module.dilation), groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return dict(
            num_features=module.num_features, eps=module.eps, momentum=module.momentum,
            affine=module.affine, track_running_stats=module.track_running_stats,
        )
    raise TypeError(f"surgery does not handle {type(module).__name__}")


def _padding(module: nn.Conv2d) -> str | list[int]:
    return module.padding if isinstance(module.padding, str) else list(module.padding)


RESIZABLE = {cls.__name__: cls for cls in (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)}


def build_module(type_name: str, config: dict, like: nn.Module | None = None) -> nn.Module:
    """A fresh module of type ``type_name`` from :func:`module_config` output (dtype/device of ``like``)."""
    if type_name not in RESIZABLE:
        raise TypeError(f"cannot rebuild a {type_name}; supported: {', '.join(RESIZABLE)}")
    tensors = [] if like is None else [*like.parameters(), *like.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    factory = dict(device=floats[0].device, dtype=floats[0].dtype) if floats else {}
    return RESIZABLE[type_name](**config, **factory)


def _new_like(module: nn.Module, **changes) -> nn.Module:
    """A module of the same type, dtype and device with some constructor arguments changed."""
    new = build_module(type(module).__name__, {**module_config(module), **changes}, like=module)
    new.train(module.training)
    return new


@torch.no_grad()
def slice_producer(module: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of a Linear/Conv2d producer keeping only the output channels ``keep`` (k,)."""
    if isinstance(module, nn.Linear):
        new = _new_like(module, out_features=keep.numel())
    else:
        new = _new_like(module, out_channels=keep.numel())
    new.weight.copy_(module.weight[keep])
    if module.bias is not None:
        new.bias.copy_(module.bias[keep])
    return new


@torch.no_grad()
def slice_batchnorm(module: nn.Module, keep: Tensor) -> nn.Module:
    """A copy of a BatchNorm keeping the features ``keep``: affine parameters and running stats."""
    new = _new_like(module, num_features=keep.numel())
    if module.affine:
        new.weight.copy_(module.weight[keep])
        new.bias.copy_(module.bias[keep])
    if module.track_running_stats:
        new.running_mean.copy_(module.running_mean[keep])
        new.running_var.copy_(module.running_var[keep])
        new.num_batches_tracked.copy_(module.num_batches_tracked)
    return new


def consumer_weight_matrix(module: nn.Module) -> Tensor:
    """The consumer weight as W of shape (d, m): Linear weight.T, Conv2d weight.reshape(m, -1).T."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).T


@torch.no_grad()
def slice_consumer(
    module: nn.Module, keep: Tensor, group_size: int, weight: Tensor | None = None
) -> nn.Module:
    """A copy of a Linear/Conv2d consumer reading only the channel groups ``keep``.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
    keep : Tensor of shape (k,)
        Sorted kept groups.
    group_size : int
    weight : Tensor of shape (k * group_size, m), optional
        The refit weight W'_S (reweighting); ``None`` slices the old weight.
    """
    cols = group_columns(keep, group_size)  # (k g,)
    old = consumer_weight_matrix(module)  # (d, m)
    new_w = old[cols] if weight is None else weight  # (k g, m)
    if new_w.shape != (cols.numel(), old.shape[1]):
        raise ValueError(f"refit weight must have shape {(cols.numel(), old.shape[1])}, got {tuple(new_w.shape)}")
    if isinstance(module, nn.Linear):
        new = _new_like(module, in_features=cols.numel())
        new.weight.copy_(new_w.T)
    else:
        new = _new_like(module, in_channels=keep.numel())
        new.weight.copy_(new_w.T.reshape(new.weight.shape))
    if module.bias is not None:
        new.bias.copy_(module.bias)
    return new


def prune_site_(
    model: nn.Module, site: PruningSite, keep: Tensor, consumer_weight: Tensor | None = None
) -> None:
    """Prune one site of ``model`` in place.

    Parameters
    ----------
    model : nn.Module
        Edited in place (callers pass a copy).
    site : PruningSite
    keep : Tensor of shape (k,), int64
        Sorted producer channels to keep.
    consumer_weight : Tensor of shape (k * site.group_size, m), optional
        Refit consumer weight; ``None`` keeps the old weights of the kept columns.

    Raises
    ------
    ValueError
        On an invalid ``keep`` or a weight of the wrong shape.
    """
    keep = _check_keep(keep, site.channels, site.name)
    producer = get_module(model, site.producer)
    set_module(model, site.producer, slice_producer(producer, keep.to(producer.weight.device)))
    for bn in site.batchnorms:
        module = get_module(model, bn)
        set_module(model, bn, slice_batchnorm(module, keep.to(module.weight.device)))
    consumer = get_module(model, site.consumer)
    if consumer_weight is not None:
        consumer_weight = consumer_weight.to(consumer.weight)
    set_module(model, site.consumer, slice_consumer(consumer, keep, site.group_size, consumer_weight))


def prune_model(
    model: nn.Module,
    sites: list[PruningSite],
    keep: Mapping[str, Tensor],
    consumer_weights: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """A pruned deep copy of ``model``; the input model is not modified.

    Parameters
    ----------
    model : nn.Module
    sites : list of PruningSite
    keep : mapping site name -> sorted keep indices
    consumer_weights : mapping site name -> refit weight, optional
    """
    pruned = copy.deepcopy(model)
    weights = consumer_weights or {}
    for site in sites:
        if site.name in keep:
            prune_site_(pruned, site, keep[site.name], weights.get(site.name))
    return pruned
