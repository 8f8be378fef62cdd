"""Trace a model into a torch.fx graph with tensor shapes, by the route that works for it.

Three routes, tried in order (:func:`trace`):

1. plain symbolic tracing (torch.fx), with Linear/Conv modules of any subclass
   kept as single nodes and LayerNorm/GroupNorm traced into their functional
   calls (so their weights appear as parameters the site fill can slice);
2. *concrete* tracing for forwards with Python control flow on shapes
   (``if x.shape[1] != 3: raise ...``, ``B, N, C = x.shape`` followed by a
   branch): every node is also run on the example input, and a branch on a
   value computed only from shapes takes the branch the example takes. Shape
   reads stay graph nodes (the batch size is not frozen). A branch on tensor
   *values* is refused;
3. user-named leaf modules (``leaf_modules``): kept whole as single opaque
   nodes, so their forward is never traced (their layers are reported as not
   prunable, the rest of the model is).

If nothing works, :class:`TraceError` names the fix.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Iterable

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from subprune.calibration import Batch, check_module
from subprune.shortcuts import ZeroPadShortcut

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)  # every layer with weights that sites report on
TRACED_NORMS = (nn.LayerNorm, nn.GroupNorm)  # traced into F.layer_norm / F.group_norm: their weights get sliced
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device", "ndimension"}


class TraceError(ValueError):
    """The model could not be traced or run on the example input."""


def is_shape_read(node: torch.fx.Node) -> bool:
    """A node that reads a tensor's shape, dtype or device, not its values."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in SHAPE_ATTRIBUTES
        return node.target in (builtins.len, torch.numel)
    return False


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with subprune's leaves: Linear/Conv (any subclass), ZeroPadShortcut, user leaves."""

    def __init__(self, leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_names or isinstance(module, (ZeroPadShortcut, *LAYERS)):
            return True
        if isinstance(module, TRACED_NORMS):
            return False
        return super().is_leaf_module(module, qualified_name)


class _ConcreteTracer(_Tracer):
    """Also runs every node on the example input; branches on shape-only values take the example's branch."""

    def __init__(self, batch: Batch, values: list, leaf_modules: Iterable[str] = ()):
        super().__init__(leaf_modules)
        self.batch, self.values = batch, list(values)
        self.placeholders = 0
        self.outputs: dict[str, list] = {}  # module name -> its outputs on the example, in call order

    def trace(self, root, concrete_args=None):
        # Calling a module while tracing would add it to the graph: read leaf outputs from one real run instead.
        handles = [m.register_forward_hook(lambda mod, args, out, n=n: self.outputs.setdefault(n, []).append(out))
                   for n, m in root.named_modules()]
        try:
            with torch.no_grad():
                self.batch.run(root)
        finally:
            for h in handles:
                h.remove()
        return super().trace(root, concrete_args)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        inputs: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
        value, known = None, all(n.meta.get("concrete_known", False) for n in inputs)
        if kind == "placeholder":
            value = self.values[self.placeholders] if self.placeholders < len(self.values) else (
                node.args[0] if node.args else None)
            self.placeholders += 1
            known = True
        elif kind == "call_module":
            calls = self.outputs.get(target, [])
            value, known = (calls.pop(0), True) if calls else (None, False)
        elif known:
            real = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["concrete"])
            try:
                with torch.no_grad():
                    value = _run(self.root, kind, target, *real)
            except Exception:  # an op that fails on its own inputs: its value stays unknown
                known = False
        node.meta["concrete"], node.meta["concrete_known"] = value, known
        # A value computed from tensor data (not only from shapes) cannot steer a branch.
        node.meta["data_dependent"] = kind != "placeholder" and not is_shape_read(node) and (
            isinstance(value, Tensor) or any(n.meta.get("data_dependent", True) for n in inputs)
        )
        return proxy

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        node = obj.node
        if not node.meta.get("concrete_known") or node.meta.get("data_dependent", True):
            raise TraceError(f"forward() branches on the tensor values of '{node.name}'")
        return bool(node.meta["concrete"])

    def iter(self, obj: torch.fx.Proxy):
        node = obj.node
        value = node.meta.get("concrete")
        # The length of a shape or of a split's parts depends on shapes only, never on tensor values.
        if node.meta.get("concrete_known") and (isinstance(value, (tuple, list)) or not node.meta.get("data_dependent",
                                                                                                       True)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


def _run(root: nn.Module, kind: str, target, args, kwargs):
    if kind == "get_attr":
        value = root
        for part in target.split("."):
            value = getattr(value, part)
        return value
    if kind == "call_function":
        return target(*args, **kwargs)
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def trace(model: nn.Module, example_input: Tensor | Batch, leaf_modules: Iterable[str] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` (see the module docstring) and record tensor shapes from ``example_input``.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    example_input : Tensor of shape (N, ...) or subprune.calibration.Batch
        A small batch the model accepts (``model(x)``, or several inputs);
        ``forward`` arguments it does not give as Tensors are fixed while
        tracing (torch.fx ``concrete_args``, see :mod:`subprune.calibration`).
    leaf_modules : iterable of str
        Qualified names of submodules kept whole (not traced into).

    Returns
    -------
    torch.fx.GraphModule
        Every node holding a tensor has ``meta["tensor_meta"]`` (shape, dtype).

    Raises
    ------
    TypeError
        If ``model`` is TorchScript or a ``torch.compile`` wrapper, or the
        example does not fit ``forward``'s signature.
    TraceError
        If no route traces the model (the message names the module to make a
        leaf or the check to move out of forward()), or the example input does
        not fit the model.
    """
    check_module(model)
    batch = example_input if isinstance(example_input, Batch) else Batch((example_input,))
    concrete, values = batch.trace_arguments(model)
    leaf_modules = tuple(leaf_modules)
    unknown = [n for n in leaf_modules if n not in dict(model.named_modules())]
    if unknown:
        raise TraceError(f"leaf_modules names {unknown}, which are not submodules of {type(model).__name__}")
    try:  # a plain forward first: its error names the real cause, without ShapeProp's printed traceback
        with torch.no_grad():
            batch.run(model)
    except Exception as exc:
        raise TraceError(
            f"the model does not run on {_shapes(batch)} ({_first_line(exc)}); pass calibration inputs "
            "preprocessed as the model expects, with the batch along dim 0"
        ) from exc
    name = type(model).__name__
    try:
        graph = _Tracer(leaf_modules).trace(model, concrete_args=concrete or None)
    except Exception as plain:  # torch.fx raises many types
        try:
            graph = _ConcreteTracer(batch, values, leaf_modules).trace(model, concrete_args=concrete or None)
        except Exception as concrete_error:
            where = _failing_module(model, batch, leaf_modules)
            fix = (f"name '{where}' in leaf_modules (PruneConfig(leaf_modules=('{where}',))) to keep it whole"
                   if where else "move the check out of forward(), fix the inputs it depends on with "
                   "concrete_args={name: value}, or name the module that holds it in leaf_modules")
            raise TraceError(
                f"torch.fx could not trace {name}: {_first_line(plain)}; tracing with concrete shapes failed too "
                f"({_first_line(concrete_error)}): {fix}"
            ) from concrete_error
    graph_module = torch.fx.GraphModule(model, graph, name)
    propagation = ShapeProp(graph_module)
    propagation.extra_traceback = False
    try:
        with torch.no_grad():
            propagation.propagate(*values)
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {name} does not run on {_shapes(batch)} although the model does "
            f"({_first_line(exc)}): an input changes the control flow; fix it while tracing with "
            "prune(..., concrete_args={name: value})"
        ) from exc
    return graph_module


def _shapes(batch: Batch) -> str:
    """``samples of shape (1, 28, 28) and dtype float32`` for one input, the batch's description otherwise."""
    if len(batch.args) == 1 and not batch.kwargs and isinstance(batch.args[0], Tensor):
        x = batch.args[0]
        return f"samples of shape {tuple(x.shape[1:])} and dtype {str(x.dtype).removeprefix('torch.')}"
    return f"the calibration inputs ({batch.describe()})"


def _failing_module(model: nn.Module, batch: Batch, leaf_modules: tuple[str, ...]) -> str | None:
    """The smallest submodule whose own forward stops tracing, found by tracing each child alone."""
    inputs: dict[str, tuple] = {}
    def keep(name: str, args: tuple) -> None:  # returns None: a pre-hook's return value would replace the input
        inputs.setdefault(name, args)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(n, args))
               for n, m in model.named_modules() if n and n not in leaf_modules]
    try:
        with torch.no_grad():
            batch.run(model)
    finally:
        for h in handles:
            h.remove()
    failing = None
    for name, args in inputs.items():
        module = model.get_submodule(name)
        if not args or not isinstance(args[0], Tensor) or isinstance(module, LAYERS):
            continue
        inner = tuple(n[len(name) + 1 :] for n in leaf_modules if n.startswith(name + "."))
        try:
            _ConcreteTracer(Batch(tuple(args)), list(args), inner).trace(module)
        except Exception:
            if failing is None or name.startswith(failing + "."):
                failing = name  # deeper is better: the smallest module to keep whole
    return failing


def shape(node) -> tuple[int, ...] | None:
    """The recorded shape of a tensor node (None for non-tensors and tuples)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def part_shapes(node) -> list[tuple[int, ...]] | None:
    """Shapes of the tensors of a tuple-valued node (split, chunk, unbind)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if isinstance(meta, (tuple, list)) and all(hasattr(m, "shape") for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def is_tensor(node) -> bool:
    """A node whose value is a tensor or a tuple of tensors."""
    return isinstance(node, torch.fx.Node) and node.meta.get("tensor_meta") is not None


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The distinct tensor-valued inputs of ``node`` (shape reads and ints excluded)."""
    inputs: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return [n for n in dict.fromkeys(inputs) if is_tensor(n)]


def map_dim(src: tuple[int, ...], dst: tuple[int, ...], dim: int, columns: int) -> tuple[int, int] | None:
    """Where the channel dimension ``dim`` of a tensor of shape ``src`` lies after a reshape to ``dst``.

    Along ``dim`` each channel holds ``columns`` consecutive indices (more than 1
    after a flatten merged the dimensions behind the channels into it). A
    row-major reshape keeps the channels intact when the dimensions before them
    multiply to the same number and the channel dimension, possibly merged with
    (or split from) the dimensions right behind it, reappears whole.

    Returns
    -------
    (dim', columns') or None
        None when the reshape mixes the channels with other dimensions.
    """
    outer, size = math.prod(src[:dim]), src[dim]
    for d in range(len(dst)):
        if math.prod(dst[:d]) != outer:
            continue
        if dst[d] == size:
            return d, columns
        merged = size
        for j in range(dim + 1, len(src)):  # channels merged with the dimensions behind them (a flatten)
            merged *= src[j]
            if dst[d] == merged:
                return d, columns * (merged // size)
        if columns > 1 and size % dst[d] == 0 and columns % (size // dst[d]) == 0:  # an unflatten of the columns
            return d, columns // (size // dst[d])
    return None


ADDITIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
PRODUCTS = {operator.mul, operator.imul, torch.mul}
DIVISIONS = {operator.truediv, operator.itruediv, torch.div}
