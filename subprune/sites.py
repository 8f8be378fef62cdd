"""Find pruning sites by tracing the model's graph with torch.fx.

A pruning site is a set of channels removed together: the output channels of a
producer (Linear out-features or Conv2d out-channels), carried through
channel-wise operations (BatchNorm, activations, pooling, dropout, flatten,
depthwise and grouped convolutions, squeeze-and-excitation scaling,
concatenation) to every consumer (Linear or Conv2d) that reads them and whose
weights are refit (DESIGN.md Sec. 2). The channel set is found by a flood fill
over the traced graph: every tensor that carries the same channels belongs to
the site, with the offset at which they sit (a concatenation shifts them).

*Block-internal* sites (the default) have one producer, plus the
squeeze-and-excitation convolutions whose output scales the channels. Channels
tied by a residual addition (``a + b``) or an elementwise product of two
feature maps belong to several producers: they form a *coupled* site, found
only with ``coupled=True``, in which every producer, BatchNorm and consumer that
shares them is sliced together. A grouped convolution on the way makes the
site's unit a whole group (channels of one group are kept or removed together).

A parameter-free "option A" shortcut written as
:class:`subprune.shortcuts.ZeroPadShortcut` (subsample, then zero channels
before and after) is a leaf of the traced graph: the channels it carries are
shifted by its front padding, and its zero channels belong to the sites of the
producers they are added to. A site's channels are a contiguous range of each
module; when a shortcut splits a producer's output channels into a data part
and zero parts, each part is its own site, named ``producer[start:end]``. An
inline ``F.pad`` of the channel dimension cannot be rebuilt and stops the site.

Every Linear/Conv2d that is neither in a site nor pruned with one is reported
with the reason; nothing is half-pruned.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from subprune.calibration import Batch, check_module
from subprune.shortcuts import ZeroPadShortcut

PRODUCERS = (nn.Linear, nn.Conv2d)

CHANNELWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
# Per-sample scalings from torchvision and timm (identity in eval mode), matched by class name.
CHANNELWISE_MODULE_NAMES = {"StochasticDepth", "DropPath", "DropBlock2d"}
# Matched by name: torch.relu, F.relu and torch.nn.functional's dispatch wrappers
# (F.max_pool2d traces as `_max_pool2d` or `max_pool2d`) all count.
CHANNELWISE_FUNCTIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "hardtanh", "mish", "dropout", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices",
    "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
FLATTEN_METHODS = {"view", "reshape", "flatten"}


class UnprunableLayerError(ValueError):
    """A layer the user asked to prune is not the producer of any pruning site."""


class TraceError(ValueError):
    """The model could not be traced or run on the example input."""


@dataclass(frozen=True)
class ChannelRange:
    """Where a site's channels lie in one module.

    Attributes
    ----------
    module : str
        Qualified module name.
    start : int
        First index of the site in the module's channel dimension of the dense
        model: output channels for producers and BatchNorms, input units for
        consumers.
    span : int
        Number of indices the site covers: ``channels`` units of ``span //
        channels`` indices each, contiguous and unit-major.
    kernel : int
        Weight columns per index (consumers only): kh*kw for a Conv2d, H*W for a
        Linear after a flatten, else 1.
    """

    module: str
    start: int
    span: int
    kernel: int = 1


@dataclass(frozen=True)
class ZeroPadRange:
    """Zero channels of a :class:`~subprune.shortcuts.ZeroPadShortcut` that a site removes.

    Attributes
    ----------
    module : str
        Qualified name of the shortcut module.
    side : {"front", "back"}
        The zero channels before or after the shortcut's input channels.
    span : int
        How many of them the site covers (``channels`` units of ``span // channels``).
    """

    module: str
    side: str
    span: int


@dataclass(frozen=True)
class PruningSite:
    """A set of channels removed together, with every module that holds them.

    Attributes
    ----------
    name : str
        The site's name: its first producer's qualified module name.
    producer : str
        The first producer (the one named by ``name``).
    consumer : str
        The first consumer in graph order.
    batchnorms : tuple of str
        BatchNorm modules sliced with the channels.
    channels : int
        n, the number of units that can be kept or removed: channels, or whole
        groups when a grouped convolution carries them.
    group_size : int
        Solver columns per unit, summed over consumers: 1 (Linear), kh*kw
        (Conv2d), H*W (Conv2d -> flatten -> Linear), times the channels per unit.
        With one consumer reading all its input, group c is columns
        c*g .. c*g+g-1 of its weight.
    producers : tuple of ChannelRange
        Every module whose output channels are removed (several for a coupled
        site; squeeze-and-excitation expansion convolutions too).
    consumers : tuple of ChannelRange
        Every module whose input columns are removed and whose weight is refit.
    sliced : tuple of ChannelRange
        BatchNorms, with where the channels lie in them.
    groupwise : tuple of str
        Depthwise or grouped convolutions that carry the channels: whole groups
        are kept (their ``groups`` shrinks).
    coupled_by : tuple of str
        Graph nodes (additions, products) that tie several producers; empty for
        a block-internal site.
    zero_pads : tuple of ZeroPadRange
        Zero channels of option-A shortcuts that are added to the site's channels:
        the shortcut is rebuilt with fewer of them.
    """

    name: str
    producer: str
    consumer: str
    batchnorms: tuple[str, ...]
    channels: int
    group_size: int
    producers: tuple[ChannelRange, ...] = ()
    consumers: tuple[ChannelRange, ...] = ()
    sliced: tuple[ChannelRange, ...] = ()
    groupwise: tuple[str, ...] = ()
    coupled_by: tuple[str, ...] = ()
    zero_pads: tuple[ZeroPadRange, ...] = ()

    def __post_init__(self) -> None:
        # A site built by hand as a plain chain: one producer, BatchNorms, one consumer reading all.
        if not self.producers:
            object.__setattr__(self, "producers", (ChannelRange(self.producer, 0, self.channels),))
        if not self.consumers:
            object.__setattr__(
                self, "consumers", (ChannelRange(self.consumer, 0, self.channels, self.group_size),)
            )
        if not self.sliced and self.batchnorms:
            object.__setattr__(self, "sliced", tuple(ChannelRange(b, 0, self.channels) for b in self.batchnorms))

    @property
    def coupled(self) -> bool:
        """True if several producers are tied by an addition or product."""
        return bool(self.coupled_by)

    def consumer_group_size(self, consumer: ChannelRange) -> int:
        """Weight columns per unit of this site in ``consumer``."""
        return consumer.span // self.channels * consumer.kernel


@dataclass(frozen=True)
class SkippedLayer:
    """A Linear/Conv2d that cannot be pruned, and why."""

    name: str
    reason: str


def trace(model: nn.Module, example_input: Tensor | Batch) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and record tensor shapes from ``example_input``.

    ``example_input`` is a Tensor (``model(x)``) or a :class:`subprune.calibration.Batch`
    (several inputs); ``forward`` arguments it does not give as Tensors are
    fixed while tracing (torch.fx ``concrete_args``, see :mod:`subprune.calibration`).

    Raises
    ------
    TypeError
        If ``model`` is TorchScript or a ``torch.compile`` wrapper, or the
        example does not fit ``forward``'s signature.
    TraceError
        If torch.fx cannot trace the model (data-dependent control flow) or the
        example input does not fit the model.
    """
    check_module(model)
    batch = example_input if isinstance(example_input, Batch) else Batch((example_input,))
    concrete, values = batch.trace_arguments(model)
    try:
        graph_module = torch.fx.GraphModule(model, _Tracer().trace(model, concrete_args=concrete or None),
                                            type(model).__name__)
    except Exception as exc:  # torch.fx raises many types; re-raise one with the fix
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Models with Python "
            "control flow on tensor values or shapes cannot be traced; move such checks "
            "out of forward(), or fix the inputs they depend on with concrete_args={name: value}"
        ) from exc
    try:  # a plain forward first: its error names the real cause, without ShapeProp's printed traceback
        with torch.no_grad():
            batch.run(model)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"the model does not run on {_shapes(batch)} ({detail}); pass calibration inputs "
            "preprocessed as the model expects, with the batch along dim 0"
        ) from exc
    propagation = ShapeProp(graph_module)
    propagation.extra_traceback = False
    try:
        with torch.no_grad():
            propagation.propagate(*values)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"the traced graph of {type(model).__name__} does not run on {_shapes(batch)} although the model does "
            f"({detail}): an input changes the control flow; fix it while tracing with "
            "prune(..., concrete_args={name: value})"
        ) from exc
    return graph_module


def _shapes(batch: Batch) -> str:
    """``samples of shape (1, 28, 28) and dtype float32`` for one input, the batch's description otherwise."""
    if len(batch.args) == 1 and not batch.kwargs and isinstance(batch.args[0], Tensor):
        x = batch.args[0]
        return f"samples of shape {tuple(x.shape[1:])} and dtype {str(x.dtype).removeprefix('torch.')}"
    return f"the calibration inputs ({batch.describe()})"


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping :class:`ZeroPadShortcut` as one call_module node (its pad is rebuilt)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ZeroPadShortcut) or super().is_leaf_module(module, qualified_name)


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    inputs: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return list(dict.fromkeys(inputs))


def _is_flatten(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """A flatten/view/reshape that maps (N, C, *spatial) to (N, C * prod(spatial))."""
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(before) < 3 or len(after) != 2:
        return False
    return after[0] == before[0] and after[1] == math.prod(before[1:])


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


_ADDITIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_SCALARS = _ADDITIONS | _PRODUCTS | {operator.truediv, torch.div}
_RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_MEANS = {"mean", "amax", "sum"}


class _Fail(Exception):
    """The flood fill met something it cannot prune through (internal)."""


class _Split(Exception):
    """The site's channels straddle a boundary (data | zero padding): flood the parts apart (internal)."""

    def __init__(self, units: list[int], where: str):
        super().__init__(units)
        self.units, self.where = units, where


class _Regroup(Exception):
    """A grouped convolution needs the site's unit to be one of its groups (internal)."""

    def __init__(self, groups: int):
        super().__init__(groups)
        self.groups = groups


class _Flood:
    """Flood fill of one channel set from a producer (see the module docstring)."""

    def __init__(self, graph_module, modules, call_counts, start: torch.fx.Node, units: int, width: int,
                 offset: int = 0):
        self.modules, self.call_counts = modules, call_counts
        self.n = units
        self.state: dict[torch.fx.Node, tuple[int, int, int]] = {}  # node -> (offset, width, columns)
        self.producers: dict[str, ChannelRange] = {}
        self.consumers: dict[str, ChannelRange] = {}
        self.sliced: dict[str, ChannelRange] = {}
        self.groupwise: list[str] = []
        self.coupled_by: list[str] = []
        self.zero_pads: dict[tuple[str, str], ZeroPadRange] = {}
        self.queue: list[torch.fx.Node] = []
        self._visit(start, (offset, width, 1))
        while self.queue:
            node = self.queue.pop(0)
            self._backward(node)
            for user in list(node.users):
                self._forward(node, user)

    # -- classification -------------------------------------------------------------------------
    def _module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.modules[node.target] if node.op == "call_module" else None

    def _kind(self, node: torch.fx.Node) -> str:
        """One of producer, groupwise, batchnorm, unary, reshape, cat, join, zeropad, placeholder, output, other."""
        if node.op in ("placeholder", "output", "get_attr"):
            return node.op
        module = self._module(node)
        name = getattr(node.target, "__name__", str(node.target))
        n_inputs = len(_tensor_inputs(node))
        if isinstance(module, ZeroPadShortcut):
            if self.call_counts.get(node.target, 0) > 1:
                raise _Fail(f"shortcut '{node.target}' is called {self.call_counts[node.target]} times")
            return "zeropad"
        if module is not None:
            stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
            if stateful and self.call_counts.get(node.target, 0) > 1:
                raise _Fail(f"module '{node.target}' is called {self.call_counts[node.target]} times")
            if isinstance(module, nn.Conv2d):
                return "producer" if module.groups == 1 else "groupwise"
            if isinstance(module, nn.Linear):
                return "producer"
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                return "batchnorm"
            if isinstance(module, CHANNELWISE_MODULES) or type(module).__name__ in CHANNELWISE_MODULE_NAMES:
                return "unary"
            if isinstance(module, (nn.Flatten, nn.Unflatten)):
                return "reshape"
            return "other"
        if node.op == "call_function":
            if node.target is torch.cat:
                return "cat"
            if node.target in _ADDITIONS | _PRODUCTS and n_inputs == 2:
                return "join"
            if node.target in _SCALARS and n_inputs == 1:
                return "unary"
            if name in CHANNELWISE_FUNCTIONS and n_inputs == 1 and node.args and node.args[0] in _tensor_inputs(node):
                return "unary"
            if node.target is torch.flatten:
                return "reshape"
            if node.target is operator.getitem and n_inputs == 1 and self._spatial_index(node):
                return "unary"
            if name == "pad" and n_inputs == 1:
                pad = tuple(node.args[1]) if len(node.args) > 1 else tuple(node.kwargs.get("pad", ()))
                shape = _shape(node.args[0])
                if shape is not None and not any(pad[2 * (len(shape) - 2):]):
                    return "unary"  # pads spatial dimensions only
                raise _Fail(f"'{node.name}' (pad) zero-pads the channel dimension (e.g. an option-A shortcut) by "
                            "amounts fixed in forward(); write the shortcut as subprune.shortcuts.ZeroPadShortcut "
                            "to prune through it")
            if node.target is torch.mean and n_inputs == 1:
                return "mean"
        if node.op == "call_method":
            if node.target in CHANNELWISE_METHODS and n_inputs == 1:
                return "unary"
            if node.target in _RESHAPES and n_inputs == 1:
                return "reshape"
            if node.target in ("add", "sub", "mul") and n_inputs == 2:
                return "join"
            if node.target in ("add", "sub", "mul", "div") and n_inputs == 1:
                return "unary"
            if node.target in _MEANS and n_inputs == 1:
                return "mean"
        return "other"

    @staticmethod
    def _spatial_index(node: torch.fx.Node) -> bool:
        """x[:, :, ...] that slices only dimensions after the channels."""
        index = node.args[1] if len(node.args) > 1 else None
        if not isinstance(index, tuple) or len(index) < 2:
            return False
        full = slice(None, None, None)
        return index[0] == full and index[1] == full and all(isinstance(i, slice) for i in index[2:])

    @staticmethod
    def _describe(node: torch.fx.Node) -> str:
        return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"

    # -- traversal ------------------------------------------------------------------------------
    def _visit(self, node: torch.fx.Node, state: tuple[int, int, int]) -> None:
        if node in self.state:
            if self.state[node] != state:
                raise _Fail(f"its channels reach {self._describe(node)} at two different positions")
            return
        offset, width, columns = state
        kind = self._kind(node)
        if kind in ("producer", "batchnorm", "groupwise") and columns != 1:
            raise _Fail(f"module '{node.target}' reads flattened channels")
        span = self.n * width
        if kind == "producer":
            self.producers[node.target] = ChannelRange(node.target, offset, span)
        elif kind == "batchnorm":
            self.sliced[node.target] = ChannelRange(node.target, offset, span)
        elif kind == "groupwise":
            self.groupwise.append(node.target)
        self.state[node] = state
        self.queue.append(node)

    def _mean_keeps_channels(self, node: torch.fx.Node) -> bool:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        shape = _shape(node.args[0])
        if dims is None or shape is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        return all(d % len(shape) >= 2 for d in dims)

    def _reshape_columns(self, node: torch.fx.Node, source: torch.fx.Node, columns: int, forward: bool) -> int:
        """New columns-per-channel across a reshape from ``source`` to ``node``, or _Fail."""
        before, after = _shape(source), _shape(node)
        if before is None or after is None:
            raise _Fail(f"{self._describe(node)} has no recorded shape")
        if _strip_ones(before) == _strip_ones(after):
            return columns
        if _is_flatten(node, source):
            spatial = math.prod(before[2:])
            if forward:
                return columns * spatial
            if columns % spatial:
                raise _Fail(f"{self._describe(node)} reshapes the channels in an unsupported way")
            return columns // spatial
        raise _Fail(f"{self._describe(node)} reshapes the channels in an unsupported way")

    def _forward(self, node: torch.fx.Node, user: torch.fx.Node) -> None:
        """``user`` reads ``node``'s channels."""
        offset, width, columns = self.state[node]
        kind = self._kind(user)
        if kind == "output":
            raise _Fail("its outputs are the model's outputs (last layer)")
        if kind == "producer":  # a consumer
            module = self._module(user)
            if user.args[0] is not node or len(_tensor_inputs(user)) != 1:
                raise _Fail(f"consumer '{user.target}' reads the channels in an unsupported way")
            if user.target in self.consumers:
                raise _Fail(f"consumer '{user.target}' reads the channels twice")
            if isinstance(module, nn.Conv2d):
                if columns != 1:
                    raise _Fail(f"consumer '{user.target}' is a Conv2d after a flatten")
                if module.padding_mode != "zeros":
                    raise _Fail(f"consumer '{user.target}' uses padding_mode={module.padding_mode!r}")
                kernel = module.kernel_size[0] * module.kernel_size[1]
            else:
                shape = _shape(node)
                if shape is None or len(shape) != 2:
                    raise _Fail(f"Linear consumer '{user.target}' reads a tensor of shape {shape}, not (N, features)")
                kernel = columns
            self.consumers[user.target] = ChannelRange(user.target, offset, self.n * width, kernel)
            return
        self._visit(user, self._through(user, node, (offset, width, columns), kind, forward=True))

    def _backward(self, node: torch.fx.Node) -> None:
        """The inputs of ``node`` carry the same channels (unless ``node`` is a producer)."""
        kind = self._kind(node)
        if kind == "producer":
            return
        if kind in ("placeholder", "get_attr"):
            raise _Fail(f"its channels are tied to the model input or a constant {self._describe(node)}")
        if kind == "cat":
            offset, width, columns = self.state[node]
            before = 0
            for source in node.args[0]:
                size = _shape(source)[1]
                if before <= offset and offset + self.n * width <= before + size:
                    self._visit(source, (offset - before, width, columns))
                    return
                before += size
            raise _Fail(f"its channels straddle the inputs of the concatenation {self._describe(node)}")
        if kind == "zeropad":
            self._backward_zeropad(node)
            return
        for source in _tensor_inputs(node):
            self._visit(source, self._through(node, source, self.state[node], kind, forward=False))

    def _backward_zeropad(self, node: torch.fx.Node) -> None:
        """Output channels of a ZeroPadShortcut: its zero channels, or its input's channels shifted by ``front``."""
        offset, width, columns = self.state[node]
        module, (source,) = self._module(node), _tensor_inputs(node)
        size, end = _shape(source)[1], offset + self.n * width
        data = (module.front, module.front + size)
        if end <= data[0] or offset >= data[1]:
            side = "front" if end <= data[0] else "back"
            self.zero_pads[(node.target, side)] = ZeroPadRange(node.target, side, self.n * width)
            return
        if data[0] <= offset and end <= data[1]:
            self._visit(source, (offset - data[0], width, columns))
            return
        cuts = [b for b in data if offset < b < end]
        if width != 1 or columns != 1:
            raise _Fail(f"its channels straddle the zero padding of the shortcut '{node.target}'")
        raise _Split([b - offset for b in cuts], node.target)

    def _through(
        self, node: torch.fx.Node, source: torch.fx.Node, state: tuple[int, int, int], kind: str, forward: bool
    ) -> tuple[int, int, int]:
        """State of ``node`` from that of its input ``source`` (forward) or the reverse."""
        offset, width, columns = state
        if kind in ("unary", "batchnorm"):
            return state
        if kind == "mean":
            if not self._mean_keeps_channels(node):
                raise _Fail(f"{self._describe(node)} reduces over the channels")
            return state
        if kind == "reshape":
            return offset, width, self._reshape_columns(node, source, columns, forward)
        if kind == "join":
            a, b = (_shape(i) for i in _tensor_inputs(node))
            if a == b:
                if node.name not in self.coupled_by:
                    self.coupled_by.append(node.name)
                return state
            gate = node.target in _PRODUCTS or node.target == "mul"
            small = min((a, b), key=lambda s: math.prod(s) if s else 0)
            if gate and small is not None and len(small) >= 3 and all(d == 1 for d in small[2:]):
                return state  # squeeze-and-excitation: (N, C, 1, 1) scales (N, C, H, W)
            raise _Fail(f"its channels are combined with a tensor of another shape by {self._describe(node)}")
        if kind == "cat":  # forward only; the backward case is in _backward
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            shape = _shape(node)
            if shape is None or dim % len(shape) != 1 or columns != 1:
                raise _Fail(f"its channels are concatenated along a non-channel dimension by {self._describe(node)}")
            sources = list(node.args[0])
            if sources.count(source) != 1:
                raise _Fail(f"the concatenation {self._describe(node)} reads the same channels twice")
            before = sum(_shape(s)[1] for s in sources[: sources.index(source)])
            return offset + before, width, columns
        if kind == "zeropad":  # forward only; the backward case is in _backward_zeropad
            if columns != 1 or len(_shape(source) or ()) != 4:
                raise _Fail(f"shortcut '{node.target}' reads flattened channels")
            return offset + self._module(node).front, width, columns
        if kind == "groupwise":
            module = self._module(node)
            groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
            if self.n != groups:
                raise _Regroup(groups)
            if offset != 0 or self.n * width != (c_in if forward else c_out):
                raise _Fail(f"grouped convolution '{node.target}' reads other channels besides the site's")
            if module.padding_mode != "zeros":
                raise _Fail(f"grouped convolution '{node.target}' uses padding_mode={module.padding_mode!r}")
            return 0, (c_out if forward else c_in) // groups, 1
        if kind == "other" and node.op == "call_module":
            raise _Fail(f"unsupported module {type(self._module(node)).__name__} '{node.target}' on the channels")
        raise _Fail(f"unsupported operation {self._describe(node)} on the channels")


def _flood_site(graph_module, modules, call_counts, node: torch.fx.Node, coupled: bool,
                start: int = 0, span: int | None = None):
    """Flood from output channels ``start .. start + span - 1`` of a producer node.

    Returns (PruningSite, producer ranges, grouped convs) or (reason, touched modules, ()); raises
    _Split when the channels must be flooded in parts.
    """
    module = modules[node.target]
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    span = channels if span is None else span
    units, tried, flood = span, set(), None
    for _ in range(4):
        try:
            flood = _Flood(graph_module, modules, call_counts, node, units, span // units, start)
            break
        except _Regroup as regroup:
            if regroup.groups in tried or span % regroup.groups:
                return (f"grouped convolutions with {regroup.groups} groups do not divide its "
                        f"{span} channels evenly"), set(), ()
            tried.add(regroup.groups)
            units = regroup.groups
        except _Fail as fail:
            return str(fail), set(), ()
    if flood is None:
        return "grouped convolutions with incompatible numbers of groups", set(), ()
    producers = list(flood.producers.values())
    others = [p.module for p in producers if p.module != node.target]
    if flood.coupled_by and not coupled:
        joins = ", ".join(f"'{j}'" for j in flood.coupled_by)
        return (
            f"its channels are tied to {', '.join(others) or 'themselves'} by the addition/product {joins} "
            "(residual connection or branch join); prune them together with coupled=True"
        ), set(others) | set(flood.groupwise), ()
    if not flood.consumers:
        return "its channels reach no Linear/Conv2d that could be refit", set(), ()
    order = {n.target: i for i, n in enumerate(graph_module.graph.nodes) if n.op == "call_module"}
    consumers = sorted(flood.consumers.values(), key=lambda c: order[c.module])
    producers.sort(key=lambda p: order[p.module])
    sliced = sorted(flood.sliced.values(), key=lambda c: order[c.module])
    name = node.target if span == channels else f"{node.target}[{start}:{start + span}]"
    site = PruningSite(
        name=name, producer=node.target, consumer=consumers[0].module,
        batchnorms=tuple(s.module for s in sliced), channels=units,
        group_size=sum(c.span // units * c.kernel for c in consumers),
        producers=tuple(producers), consumers=tuple(consumers), sliced=tuple(sliced),
        groupwise=tuple(sorted(flood.groupwise, key=order.get)), coupled_by=tuple(flood.coupled_by),
        zero_pads=tuple(sorted(flood.zero_pads.values(), key=lambda z: (order[z.module], z.side))),
    )
    return site, producers, set(flood.groupwise)


def _uncovered(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (start, span) pieces of 0..size-1 that no range in ``ranges`` covers, in order."""
    pieces, at = [], 0
    for start, span in sorted(ranges):
        if start > at:
            pieces.append((at, start - at))
        at = max(at, start + span)
    if at < size:
        pieces.append((at, size - at))
    return pieces


def find_sites(
    model: nn.Module, example_input: Tensor, coupled: bool = False
) -> tuple[list[PruningSite], list[SkippedLayer]]:
    """All pruning sites of ``model``, in forward (graph) order, and the skipped layers.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    example_input : Tensor
        A batch the model accepts (a few calibration samples), used to record
        tensor shapes (for the group size after a flatten, concatenation offsets).
    coupled : bool, default False
        Also return coupled sites: channels tied by residual additions (or
        products of feature maps) across several producers, pruned together.
        Without it their producers are skipped with the reason.

    Returns
    -------
    sites : list of PruningSite
    skipped : list of SkippedLayer
        Every Linear/Conv2d that is neither a producer of a site nor a grouped
        convolution carried by one, with the reason.

    Raises
    ------
    TraceError
        See :func:`trace`.
    """
    graph_module = trace(model, example_input)
    modules = dict(graph_module.named_modules())
    call_counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            call_counts[node.target] = call_counts.get(node.target, 0) + 1

    sites: list[PruningSite] = []
    skipped: list[SkippedLayer] = []
    covered: set[str] = set()  # grouped convolutions carried by a site
    ranges: dict[str, list[tuple[int, int]]] = {}  # producer -> (start, span) of output channels in sites
    failed: dict[str, str] = {}  # grouped conv -> reason of the site it belongs to
    seen: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], PRODUCERS):
            continue
        name, module = node.target, modules[node.target]
        if name in seen:
            continue
        seen.add(name)
        if call_counts[name] > 1:
            skipped.append(SkippedLayer(name, f"called {call_counts[name]} times (shared weights)"))
            continue
        if name in covered or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        pieces = _uncovered(ranges.get(name, []), channels)
        while pieces:  # output channels no site holds yet; a ZeroPadShortcut may split them
            start, span = pieces.pop(0)
            try:
                found, touched, grouped = _flood_site(graph_module, modules, call_counts, node, coupled, start, span)
            except _Split as split:
                if not coupled:  # the zero channels are only ever tied in by a residual addition
                    skipped.append(SkippedLayer(name, (
                        f"its channels are added to the zero-padding shortcut '{split.where}' (a residual "
                        "connection); prune them together with coupled=True")))
                    break
                cuts = [start, *(start + u for u in split.units), start + span]
                pieces = [(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)] + pieces
                continue
            label = name if span == channels else f"{name}[{start}:{start + span}]"
            if isinstance(found, str):
                skipped.append(SkippedLayer(label, found))
                for other in touched:
                    failed.setdefault(other, f"its channels belong to '{label}', which is skipped: {found}")
                continue
            sites.append(found)
            covered |= grouped
            for ref in touched:
                ranges.setdefault(ref.module, []).append((ref.start, ref.span))
    for node in graph_module.graph.nodes:  # grouped convolutions no site carries
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Conv2d) and module.groups != 1 and node.target not in covered:
            if call_counts[node.target] == 1 and all(s.name != node.target for s in skipped):
                reason = failed.get(node.target, "grouped or depthwise convolution whose channels no site carries")
                skipped.append(SkippedLayer(node.target, reason))
    # Linear/Conv2d modules that the traced graph never calls.
    for name, module in model.named_modules():
        if isinstance(module, PRODUCERS) and name not in seen:
            skipped.append(SkippedLayer(name, "not called in the traced forward pass"))
    return sites, skipped


def select_sites(
    sites: list[PruningSite], skipped: list[SkippedLayer], layers: list[str] | None
) -> list[PruningSite]:
    """Restrict ``sites`` to the producers named in ``layers`` (all sites if None).

    Raises
    ------
    UnprunableLayerError
        If a named layer is a skipped layer (the message gives the reason) or
        not a Linear/Conv2d of the model at all.
    """
    if layers is None:
        return list(sites)
    by_name = {s.name: s for s in sites}
    # Any producer of a coupled site (or an SE expansion conv) selects its whole site; a producer whose
    # channels an option-A shortcut splits into several sites selects them all.
    by_producer: dict[str, list[PruningSite]] = {}
    for s in sites:
        for p in s.producers:
            by_producer.setdefault(p.module, []).append(s)
    reasons = {s.name: s.reason for s in skipped}
    chosen = []
    for layer in layers:
        if layer in by_name or layer in by_producer:
            chosen.extend([by_name[layer]] if layer in by_name else by_producer[layer])
        elif layer in reasons:
            raise UnprunableLayerError(f"layer '{layer}' cannot be pruned: {reasons[layer]}")
        else:
            raise UnprunableLayerError(
                f"layer '{layer}' is not a Linear/Conv2d of the model; prunable layers: "
                f"{', '.join(by_name) or 'none'}"
            )
    order = {s.name: i for i, s in enumerate(sites)}
    return sorted(dict.fromkeys(chosen), key=lambda s: order[s.name])
