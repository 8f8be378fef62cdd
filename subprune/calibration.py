"""Calibration data in any form, turned into the batches the pipeline streams.

:func:`as_calibration` accepts what a PyTorch user has at hand and returns one
:class:`Calibration`: a Tensor (N, ...); a NumPy array; a ``Dataset`` (a
``TensorDataset`` included); any iterable of batches (a ``DataLoader``, a list
of Tensors); a dict of Tensors (N, ...) for a model called as ``model(**batch)``
(a tokenizer's output); a tuple of Tensors for ``model(*batch)``. Each batch may be

* a Tensor: ``model(x)``;
* a tuple/list: ``model(*batch)``; when it holds one element more than
  ``forward`` has required arguments and that element is of shape (N,), the
  last element is taken as the labels (the ``(inputs, labels)`` batches of a
  ``DataLoader`` over an image folder or a ``TensorDataset(x, y)``);
* a dict: ``model(**batch)``, with the keys ``"label"``/``"labels"`` taken out
  as the labels.

Labels are kept and used only by the methods that need them (ActGrad, GreedyFS).
Batches of the same structure are concatenated into one store (so
``PruneConfig.batch_size`` decides the forward batch); batches that cannot be
concatenated (text padded per batch) are kept and streamed as they came.

The graph (torch.fx) is traced with the calibration's Tensor arguments as
inputs; every other ``forward`` argument is fixed while tracing (torch.fx
``concrete_args``): those the batch does not give take their default value
(``forward(x, mask=None)`` traces the ``mask is None`` branch), those it gives
as Python values (a flag, a float) take that value. ``concrete_args`` overrides
this (for example ``{"mask": None}`` to trace without a mask that the batches
carry). Source of the method: El Halabi et al., NeurIPS 2022; the repository's
docs/own-model.md shows these forms in use.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Batch", "Calibration", "as_calibration", "check_module"]

LABEL_KEYS = ("label", "labels")
_FORMS = ("a Tensor (N, ...), an ndarray, a Dataset/TensorDataset, a DataLoader or list of batches, "
          "or a dict of Tensors for model(**batch)")


@dataclass(frozen=True)
class Batch:
    """One forward pass: ``model(*args, **kwargs)``, and the labels of its samples (or None).

    Attributes
    ----------
    args : tuple
        Positional inputs; Tensors have the batch along dim 0.
    kwargs : dict
        Keyword inputs (Tensors with the batch along dim 0, or fixed values).
    labels : Tensor of shape (B,) or None
    concrete_args : dict or None
        ``forward`` arguments to fix while tracing, overriding the automatic choice.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    labels: Tensor | None = None
    concrete_args: Mapping | None = None

    def __len__(self) -> int:
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.ndim:
                return int(value.shape[0])
        return 0

    def to(self, device: torch.device | str | None) -> Batch:
        """The batch with every Tensor moved to ``device`` (None: unchanged)."""
        if device is None:
            return self
        move = _mover(device)
        return Batch(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()},
                     None if self.labels is None else self.labels.to(device), self.concrete_args)

    def run(self, model: nn.Module):
        """``model(*args, **kwargs)``: the model's outputs."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[Tensor]:
        """The Tensor inputs, positional first."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, Tensor)]

    def describe(self) -> str:
        """The inputs' shapes and dtypes, for messages: ``(2, 1, 28, 28) float32``."""
        def one(v) -> str:
            if isinstance(v, Tensor):
                return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            return repr(v)
        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def trace_arguments(self, model: nn.Module) -> tuple[dict, list]:
        """torch.fx ``concrete_args`` for ``model`` and the values of its placeholders, in order.

        Every ``forward`` parameter not bound to a Tensor is fixed: to the
        batch's value, or to its default when the batch does not give it.
        ``self.concrete_args`` overrides both.

        Raises
        ------
        TypeError
            If the batch does not fit ``model.forward``'s signature (the message
            names the parameters and how to pass them).
        """
        signature, concrete_args = _signature(model), self.concrete_args
        try:
            bound = signature.bind(*self.args, **self.kwargs)
        except TypeError as exc:
            raise TypeError(f"the calibration batches ({self.describe()}) do not fit "
                            f"{type(model).__name__}.forward{signature} ({exc}): {_how_to_pass(signature)}") from exc
        concrete, values = {}, []
        for name, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                given = bound.arguments.get(name, () if param.kind == param.VAR_POSITIONAL else {})
                if given:
                    raise TypeError(f"{type(model).__name__}.forward takes *{name}/**{name}: torch.fx can trace only "
                                    "named parameters; give forward named inputs or wrap the model in a module "
                                    "whose forward names them")
                continue
            if concrete_args is not None and name in concrete_args:
                value = concrete_args[name]
                concrete[name] = value
            elif name in bound.arguments:
                value = bound.arguments[name]
                if not isinstance(value, Tensor):
                    concrete[name] = value
            elif param.default is not param.empty:
                value = param.default
                concrete[name] = value
            else:  # bind() guarantees the required ones are there
                continue
            values.append(value)
        return concrete, values


def _mover(device):
    def move(v):
        return v.to(device) if isinstance(v, Tensor) else v
    return move


def _signature(model: nn.Module) -> inspect.Signature:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return inspect.Signature([inspect.Parameter("x", inspect.Parameter.POSITIONAL_ONLY)])


def _required(signature: inspect.Signature) -> list[str]:
    return [n for n, p in signature.parameters.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _how_to_pass(signature: inspect.Signature) -> str:
    names = [n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = _required(signature)
    if len(names) <= 1:
        return "pass batches of one Tensor with the batch along dim 0"
    example = ", ".join(f"'{n}': ..." for n in required or names[:2])
    return (f"pass batches as tuples ({', '.join(required or names[:2])}) for model(*batch), or as dicts "
            f"{{{example}}} for model(**batch); inputs a batch leaves out take their default")


def check_module(model: object) -> None:
    """Refuse what subprune cannot trace or copy: non-modules, TorchScript and ``torch.compile`` wrappers.

    Raises
    ------
    TypeError
        Naming the fix: pass the original ``nn.Module``.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{type(model).__name__} is a TorchScript module: torch.fx cannot trace it; pass the "
                        "original nn.Module (the one given to torch.jit.script/trace)")
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        raise TypeError("the model is a torch.compile wrapper: pass the original nn.Module (model._orig_mod), "
                        "and compile the pruned model afterwards if you like")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _to_tensor(value, dtype: torch.dtype | None):
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        # NumPy's default float64 meets a float32 model: cast floating arrays to the model's dtype.
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return value


def _split_labels(items: list, signature: inspect.Signature) -> tuple[list, Tensor | None]:
    """(inputs, labels): the last element is the labels when forward requires one argument fewer."""
    if len(items) >= 2 and len(items) == len(_required(signature)) + 1:
        last = items[-1]
        first = next((v for v in items[:-1] if isinstance(v, Tensor)), None)
        if isinstance(last, Tensor) and last.ndim == 1 and first is not None and first.ndim and (
                last.shape[0] == first.shape[0]):
            return items[:-1], last
    return items, None


def _as_batch(item, signature: inspect.Signature, dtype: torch.dtype | None) -> Batch:
    """One batch of a data source, as ``Batch``."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, (Tensor, np.ndarray)):
        return Batch((_to_tensor(item, dtype),))
    if isinstance(item, Mapping):
        kwargs = {str(k): _to_tensor(v, dtype) for k, v in item.items() if k not in LABEL_KEYS}
        labels = next((_to_tensor(item[k], None) for k in LABEL_KEYS if k in item), None)
        return Batch((), kwargs, labels)
    if isinstance(item, (tuple, list)):
        values, labels = _split_labels([_to_tensor(v, dtype) for v in item], signature)
        return Batch(tuple(values), {}, labels)
    raise TypeError(f"a calibration batch of type {type(item).__name__} is not understood: give {_FORMS}")


def _structure(batch: Batch) -> tuple:
    """What must agree for batches to be concatenated: arity, keys, which values are Tensors, trailing shapes."""
    def one(v):
        if isinstance(v, Tensor):
            return ("tensor", tuple(v.shape[1:]), v.dtype)
        return ("value", repr(v))
    return (tuple(one(a) for a in batch.args), tuple((k, one(v)) for k, v in batch.kwargs.items()),
            batch.labels is not None)


class Calibration:
    """Calibration inputs (and optional labels), streamed as :class:`Batch` objects.

    Build one with :func:`as_calibration`; :func:`subprune.pipeline.prune` does so
    itself for whatever it is given.

    Attributes
    ----------
    concrete_args : dict or None
        Overrides of the values fixed while tracing (see the module docstring).
    """

    def __init__(self, batches: list[Batch], concrete_args: Mapping | None = None) -> None:
        if not batches:
            raise ValueError(f"the calibration data holds no batch: give {_FORMS}")
        self.concrete_args = dict(concrete_args) if concrete_args is not None else None
        structures = {_structure(b) for b in batches}
        if len(batches) > 1 and len(structures) == 1:
            first = batches[0]
            cat = (lambda vs: torch.cat(vs) if isinstance(vs[0], Tensor) else vs[0])  # noqa: E731
            args = tuple(cat([b.args[i] for b in batches]) for i in range(len(first.args)))
            kwargs = {k: cat([b.kwargs[k] for b in batches]) for k in first.kwargs}
            labels = None if first.labels is None else torch.cat([b.labels for b in batches])
            batches = [Batch(args, kwargs, labels)]
        self._batches = batches
        self.stored = len(batches) == 1  # one store, re-batched by batch_size
        self._n = sum(len(b) for b in batches)
        for b in batches:
            if b.labels is not None and b.labels.shape[:1] != (len(b),):
                raise ValueError(f"labels of shape {tuple(b.labels.shape)} for a batch of {len(b)} samples: "
                                 "give one label per sample")

    def __len__(self) -> int:
        return self._n

    @property
    def labels(self) -> Tensor | None:
        """Labels of all samples, shape (N,), or None when some batch has none."""
        if any(b.labels is None for b in self._batches):
            return None
        return torch.cat([b.labels for b in self._batches])

    def with_labels(self, labels: Tensor | None) -> Calibration:
        """A copy whose samples carry ``labels`` (shape (N,)); None: unchanged."""
        if labels is None:
            return self
        if not isinstance(labels, Tensor) or labels.shape[:1] != (len(self),):
            raise ValueError(f"labels must be a Tensor with one label per calibration sample ({len(self)}), "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        out, start = [], 0
        for b in self._batches:
            out.append(Batch(b.args, b.kwargs, labels[start : start + len(b)]))
            start += len(b)
        return Calibration(out, self.concrete_args)

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[Batch]:
        """Forward batches of at most ``batch_size`` samples (as given, when they could not be concatenated)."""
        if not self.stored:
            for b in self._batches:
                yield b.to(device)
            return
        for start in range(0, self._n, batch_size):
            yield self._slice(start, start + batch_size).to(device)

    def n_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields."""
        return -(-self._n // batch_size) if self.stored else len(self._batches)

    def head(self, n: int, device: torch.device | str | None = None) -> Batch:
        """The first ``n`` samples (of the first batch), e.g. to trace the model."""
        first = self._batches[0]
        return Batch(*_slice_parts(first, 0, min(n, len(first))), self.concrete_args).to(device)

    def _slice(self, start: int, stop: int) -> Batch:
        return Batch(*_slice_parts(self._batches[0], start, stop))

    def check_finite(self) -> None:
        """ValueError if a floating input holds NaN or infinite values."""
        for b in self._batches:
            for t in b.tensors():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError("calibration inputs hold NaN or infinite values")

    def describe(self) -> str:
        """Shapes of the first batch, for messages."""
        return self._batches[0].describe()


def _slice_parts(batch: Batch, start: int, stop: int) -> tuple[tuple, dict, Tensor | None]:
    def cut(v):
        return v[start:stop] if isinstance(v, Tensor) and v.ndim else v
    labels = None if batch.labels is None else batch.labels[start:stop]
    return tuple(cut(a) for a in batch.args), {k: cut(v) for k, v in batch.kwargs.items()}, labels


def _float_dtype(model: nn.Module | None) -> torch.dtype | None:
    if model is None:
        return None
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def as_calibration(
    data,
    model: nn.Module | None = None,
    *,
    labels: Tensor | None = None,
    concrete_args: Mapping | None = None,
    batch_size: int = 128,
) -> Calibration:
    """Turn calibration data of any supported form into a :class:`Calibration`.

    Parameters
    ----------
    data : Tensor of shape (N, ...), ndarray, Dataset, iterable of batches, dict of Tensors, tuple, or Calibration
        See the module docstring for the forms and how batches are passed to the model.
    model : nn.Module, optional
        Its ``forward`` signature tells an ``(inputs, labels)`` tuple from a
        tuple of inputs; its floating dtype is given to NumPy float arrays.
    labels : Tensor of shape (N,), optional
        Labels of the samples, for methods that need them (overrides labels the batches carry).
    concrete_args : dict, optional
        ``forward`` arguments fixed while tracing, overriding the automatic choice.
    batch_size : int
        Batch size of the ``DataLoader`` built for a ``Dataset``.

    Returns
    -------
    Calibration

    Raises
    ------
    TypeError
        If ``data`` (or one of its batches) is of no supported form; the message lists the forms.
    ValueError
        If it holds no batch, or ``labels`` do not match the samples.
    """
    if isinstance(data, Calibration):
        result = data if concrete_args is None else Calibration(data._batches, concrete_args)
        return result.with_labels(labels)
    signature = _signature(model) if model is not None else inspect.Signature(
        [inspect.Parameter("x", inspect.Parameter.POSITIONAL_ONLY)])
    dtype = _float_dtype(model)
    if isinstance(data, (Tensor, np.ndarray, Mapping, tuple)):
        batches = [_as_batch(data, signature, dtype)]
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and not isinstance(
            data, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        batches = [_as_batch(b, signature, dtype) for b in loader]
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"calibration data of type {type(data).__name__} is not understood: give {_FORMS}"
                        + (" (for a file, use subprune.datafiles.load_inputs)" if isinstance(data, str) else ""))
    else:
        batches = [_as_batch(b, signature, dtype) for b in data]
    return Calibration(batches, concrete_args).with_labels(labels)


def forward(model: nn.Module, inputs: Batch | Tensor):
    """``inputs.run(model)`` for a :class:`Batch`, ``model(inputs)`` for a Tensor."""
    return inputs.run(model) if isinstance(inputs, Batch) else model(inputs)
