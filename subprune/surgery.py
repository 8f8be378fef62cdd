"""Physical surgery: rebuild producer, BatchNorm, grouped-conv and consumer modules with fewer channels.

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

from subprune.attention import cut_heads_
from subprune.shortcuts import ZeroPadShortcut
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
    """Constructor arguments of a Linear, Conv2d, BatchNorm or ZeroPadShortcut module (JSON-serialisable)."""
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
    if isinstance(module, ZeroPadShortcut):
        return dict(stride=module.stride, front=module.front, back=module.back)
    raise TypeError(f"surgery does not handle {type(module).__name__}")


def _padding(module: nn.Conv2d) -> str | list[int]:
    return module.padding if isinstance(module.padding, str) else list(module.padding)


RESIZABLE = {cls.__name__: cls for cls in (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, ZeroPadShortcut)}


def build_module(type_name: str, config: dict, like: nn.Module | None = None) -> nn.Module:
    """A fresh module of type ``type_name`` from :func:`module_config` output (dtype/device of ``like``)."""
    if type_name not in RESIZABLE:
        raise TypeError(f"cannot rebuild a {type_name}; supported: {', '.join(RESIZABLE)}")
    tensors = [] if like is None else [*like.parameters(), *like.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    factory = dict(device=floats[0].device, dtype=floats[0].dtype) if floats else {}
    return RESIZABLE[type_name](**config, **factory)


def _new_like(module: nn.Module, **changes) -> nn.Module:
    """A module of the same type, dtype, device and ``requires_grad`` with some constructor arguments changed.

    Subclasses (timm's ``Conv2dSame``, a user's Linear with its own forward) are
    copied with their attributes and given uninitialised parameters of the new
    shapes, so they keep their own forward.
    """
    if RESIZABLE.get(type(module).__name__) is not type(module):
        return resized_copy(module, **changes)
    new = build_module(type(module).__name__, {**module_config(module), **changes}, like=module)
    new.train(module.training)
    for name, param in new.named_parameters(recurse=False):  # frozen weights stay frozen
        param.requires_grad_(getattr(module, name).requires_grad)
    return new


def resized_copy(module: nn.Module, **changes) -> nn.Module:
    """A shallow copy of a Linear/Conv2d (any subclass) with new sizes and empty parameters of those sizes.

    The copy shares nothing mutable with ``module``: its parameter, buffer,
    submodule and hook dictionaries are its own.
    """
    new = copy.copy(module)
    new.__dict__ = {k: (dict(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    for key, value in changes.items():
        setattr(new, key, value)
    if isinstance(new, nn.Linear):
        shapes = {"weight": (new.out_features, new.in_features), "bias": (new.out_features,)}
    elif isinstance(new, nn.Conv2d):
        shapes = {"weight": (new.out_channels, new.in_channels // new.groups, *new.kernel_size),
                  "bias": (new.out_channels,)}
    else:
        raise TypeError(f"surgery does not handle {type(module).__name__}")
    for name, size in shapes.items():
        old = module._parameters.get(name)
        if old is not None:
            new._parameters[name] = nn.Parameter(torch.empty(size, dtype=old.dtype, device=old.device),
                                                 requires_grad=old.requires_grad)
    return new


_SIZE_ATTRIBUTES = ("num_features", "num_channels", "normalized_shape", "dim", "embed_dim")


@torch.no_grad()
def slice_parameter_(model: nn.Module, name: str, axis: int, rows: Tensor) -> tuple[nn.Module, int, int]:
    """Keep only the entries ``rows`` along ``axis`` of the parameter or buffer ``name``, in place.

    Returns (owner module, old size, new size) along the axis.
    """
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, leaf)
    new = old.index_select(axis, rows.to(old.device)).clone()
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = new
    return owner, old.shape[axis], new.shape[axis]


def _resize_attributes(owner: nn.Module, old: int, new: int) -> None:
    """Set the size attributes of a norm or scale module that read ``old`` channels to ``new``."""
    groups = getattr(owner, "num_groups", None)
    for key in _SIZE_ATTRIBUTES:
        value = getattr(owner, key, None)
        if value == old and isinstance(value, int) and not isinstance(value, bool):
            setattr(owner, key, new)
        elif isinstance(value, tuple) and value == (old,):
            setattr(owner, key, (new,))
    for key, value in list(vars(owner).items()):  # a broadcast shape kept as an attribute: (C, 1, 1)
        if (isinstance(value, tuple) and value.count(old) == 1 and old != 1
                and all(isinstance(v, int) and v in (1, old) for v in value)):
            setattr(owner, key, tuple(new if v == old else v for v in value))
    if isinstance(groups, int) and groups > 1 and old % groups == 0 and new != old:
        owner.num_groups = new // (old // groups)  # whole groups were removed


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


@torch.no_grad()
def slice_groupwise(module: nn.Conv2d, keep: Tensor) -> nn.Conv2d:
    """A copy of a grouped (or depthwise) Conv2d keeping the whole groups ``keep`` (k,); ``groups`` becomes k."""
    groups = module.groups
    out_per_group, in_per_group = module.out_channels // groups, module.in_channels // groups
    new = _new_like(
        module, in_channels=keep.numel() * in_per_group, out_channels=keep.numel() * out_per_group,
        groups=keep.numel(),
    )
    rows = group_columns(keep, out_per_group)  # output channels of the kept groups
    new.weight.copy_(module.weight[rows])  # (k * out/G, in/G, kh, kw): a group's inputs are unchanged
    if module.bias is not None:
        new.bias.copy_(module.bias[rows])
    return new


class ChannelLayout:
    """Which dense-model indices each module dimension still holds while sites are cut one by one.

    Sites that share a module (a BatchNorm after a concatenation, a consumer
    reading several producers) address it in dense-model indices
    (:class:`subprune.sites.ChannelRange`); after one of them is cut, the
    others' indices move. The layout translates them. Keys are
    ``(module name, "in" | "out")``; values are sorted dense indices, shape (size,).
    """

    def __init__(self) -> None:
        self._alive: dict[tuple[str, str], Tensor] = {}

    def start(self, module: str, dim: str, start: int) -> int:
        """Current position of the dense index ``start`` along ``dim`` of ``module``."""
        alive = self._alive.get((module, dim))
        return start if alive is None else int((alive < start).sum())

    def alive(self, module: str, dim: str, size: int) -> Tensor:
        """Dense indices still held along ``dim`` of ``module`` (``size`` dense units if never cut), (size',)."""
        alive = self._alive.get((module, dim))
        return torch.arange(size) if alive is None else alive.clone()

    def cut(self, module: str, dim: str, size: int, start: int, span: int, kept: Tensor) -> Tensor:
        """Keep only ``kept`` (sorted, relative to ``start``) of the range [start, start + span).

        Returns the current indices kept along the dimension, shape (size - span + kept.numel(),).
        """
        alive = self._alive.get((module, dim), torch.arange(size))
        if alive.numel() != size:
            raise ValueError(f"module '{module}' has {size} {dim}put units, the layout expects {alive.numel()}")
        cur = self.start(module, dim, start)
        keep = torch.cat([torch.arange(cur), cur + kept, torch.arange(cur + span, size)])
        self._alive[(module, dim)] = alive[keep]
        return keep


def _units(keep: Tensor, width: int) -> Tensor:
    """Indices of the units ``keep`` of ``width`` contiguous indices each, shape (k * width,)."""
    return group_columns(keep, width)


def prune_site_(
    model: nn.Module,
    site: PruningSite,
    keep: Tensor,
    consumer_weight: Tensor | Mapping[str, Tensor] | None = None,
    layout: ChannelLayout | None = None,
) -> None:
    """Prune one site of ``model`` in place: producers, norms, grouped convs, consumers, parameters, zero pads.

    Parameters
    ----------
    model : nn.Module
        Edited in place (callers pass a copy).
    site : PruningSite
    keep : Tensor of shape (k,), int64
        Sorted units (channels, or groups) to keep, in 0..site.channels - 1.
    consumer_weight : Tensor or mapping consumer name -> Tensor, optional
        Refit weight of each consumer on the site's kept columns, shape
        (k * site.consumer_group_size(c), m); a single Tensor stands for the
        first consumer. Consumers not given keep their old weights on kept columns.
    layout : ChannelLayout, optional
        Shared by all sites cut from one model (needed when sites share a
        module); a fresh one is used if omitted.

    Raises
    ------
    ValueError
        On an invalid ``keep`` or a weight of the wrong shape.
    """
    keep = _check_keep(keep, site.channels, site.name)
    layout = layout if layout is not None else ChannelLayout()
    weights = {site.consumer: consumer_weight} if isinstance(consumer_weight, Tensor) else dict(consumer_weight or {})
    # Consumers first: a module that both reads and writes the site's channels (y = x + f(x)) gets its
    # refit weight written at full width, then its output rows are sliced like any producer's.
    for ref in site.consumers:
        module = get_module(model, ref.module)
        old = consumer_weight_matrix(module)  # (d, m)
        size = old.shape[0] // ref.kernel  # input units of ``kernel`` columns each
        start = layout.start(ref.module, "in", ref.start)
        units = layout.cut(ref.module, "in", size, ref.start, ref.span, _units(keep, ref.span // site.channels))
        new_w = old[group_columns(units.to(old.device), ref.kernel)].clone()  # (k' kernel, m)
        refit_w = weights.get(ref.module)
        if refit_w is not None:
            rows = keep.numel() * site.consumer_group_size(ref)
            if refit_w.shape != (rows, old.shape[1]):
                raise ValueError(f"refit weight of '{ref.module}' must have shape {(rows, old.shape[1])}, "
                                 f"got {tuple(refit_w.shape)}")
            new_w[start * ref.kernel : start * ref.kernel + rows] = refit_w.to(new_w)
        set_module(model, ref.module, _consumer_from_matrix(module, new_w, units.numel()))
    for ref in site.producers:
        module = get_module(model, ref.module)
        size = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        rows = layout.cut(ref.module, "out", size, ref.start, ref.span, _units(keep, ref.span // site.channels))
        set_module(model, ref.module, slice_producer(module, rows.to(module.weight.device)))
    for ref in site.sliced:
        module = get_module(model, ref.module)
        rows = layout.cut(ref.module, "out", module.num_features, ref.start, ref.span,
                          _units(keep, ref.span // site.channels))
        device = next(iter(module.buffers()), torch.empty(0)).device
        set_module(model, ref.module, slice_batchnorm(module, rows.to(device)))
    for name in site.groupwise:
        module = get_module(model, name)
        set_module(model, name, slice_groupwise(module, keep.to(module.weight.device)))
    resized: dict[int, tuple[nn.Module, int, int]] = {}
    for ref in site.parameters:  # functional norms, per-channel scales, embeddings: slice the entries
        tensor = _get_tensor(model, ref.name)
        size = tensor.shape[ref.axis]
        rows = layout.cut(ref.name, "param", size, ref.start, ref.span, _units(keep, ref.span // site.channels))
        owner, old, new = slice_parameter_(model, ref.name, ref.axis, rows)
        first_old = resized.get(id(owner), (owner, old, new))[1]
        resized[id(owner)] = (owner, first_old, new)
    for owner, old, new in resized.values():
        _resize_attributes(owner, old, new)
    for entry in site.sizes:  # split sizes held by a module attribute: the site's part shrinks
        owner = get_module(model, entry.module)
        sizes = list(getattr(owner, entry.attribute))
        sizes[entry.index] -= (site.channels - keep.numel()) * entry.width
        setattr(owner, entry.attribute, sizes)
    for name in site.heads:  # attention modules: fewer heads
        cut_heads_(get_module(model, name), int(keep.numel()))
    for ref in site.zero_pads:  # option-A shortcuts: fewer zero channels (all alike, so only the count matters)
        module = get_module(model, ref.module)
        removed = (site.channels - keep.numel()) * (ref.span // site.channels)
        config = module_config(module)
        config[ref.side] -= removed
        set_module(model, ref.module, _new_like(module, **config))


def _get_tensor(model: nn.Module, name: str) -> Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    tensor = getattr(owner, leaf, None)
    if not isinstance(tensor, Tensor):
        raise ValueError(f"the model has no parameter or buffer named '{name}'")
    return tensor


@torch.no_grad()
def _consumer_from_matrix(module: nn.Module, weight: Tensor, units: int) -> nn.Module:
    """A copy of a Linear/Conv2d consumer with the weight matrix ``weight`` (d', m) over ``units`` input units."""
    if isinstance(module, nn.Linear):
        new = _new_like(module, in_features=weight.shape[0])
        new.weight.copy_(weight.T)
    else:
        new = _new_like(module, in_channels=units)
        new.weight.copy_(weight.T.reshape(new.weight.shape))
    if module.bias is not None:
        new.bias.copy_(module.bias)
    return new


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
        A Tensor (first consumer) or a mapping consumer name -> Tensor per site.
    """
    pruned = copy.deepcopy(model)
    weights = consumer_weights or {}
    layout = ChannelLayout()
    for site in sites:
        if site.name in keep:
            prune_site_(pruned, site, keep[site.name], weights.get(site.name), layout)
    return pruned
