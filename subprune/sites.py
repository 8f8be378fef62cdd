"""Find pruning sites by tracing the model's graph with torch.fx.

A pruning site is a set of channels removed together: the output channels of a
producer (Linear out-features or Conv2d out-channels), carried through
channel-wise operations to every consumer (Linear or Conv2d) that reads them and
whose weights are refit (docs/how-it-works.md, "Terms"). The channel set is found by a flood
fill over the traced graph (:mod:`subprune.graph`): every tensor that carries
the same channels belongs to the site, with the dimension that holds them and
the offset at which they sit there (a concatenation shifts them, a channel
slice or split cuts them, a permute or reshape moves the dimension).

Channel-wise operations include BatchNorm (module or functional, so timm's
BatchNormAct2d and friends are covered by what they compute, not by class),
activations, pooling, dropout, spatial padding and resizing (``F.pad``,
``nn.ZeroPad2d``, ``nn.Upsample``, ``F.interpolate``), shape reads
(``x.size(0)``, ``x.shape``), permutes, reshapes that keep the channels whole,
reductions over other dimensions (a mean over tokens), a Linear acting on
another dimension (Mixer's token MLP), depthwise and grouped convolutions
(whole groups are kept), GroupNorm (whole groups), squeeze-and-excitation
gates and per-channel parameters (LayerScale, position embeddings, a class
token), whose entries are sliced with the channels. A LayerNorm over the
channels (or a GroupNorm with one group) is sliced too, but its statistics over
the remaining channels change: such a site lists it in ``renormalised`` and the
refit absorbs the change (measured in docs/zoo.md). Linear layers read and
write channels on the last dimension of any (..., C) tensor (ViT/Mixer MLPs).

*Block-internal* sites (the default) have one producer, plus the
squeeze-and-excitation convolutions whose output scales the channels. Channels
tied by a residual addition (``a + b``) or an elementwise product of two
feature maps belong to several producers: they form a *coupled* site, found
only with ``coupled=True``, in which every producer, norm and consumer that
shares them is sliced together.

A parameter-free "option A" shortcut written as
:class:`subprune.shortcuts.ZeroPadShortcut` is a leaf of the traced graph: the
channels it carries are shifted by its front padding, and its zero channels
belong to the sites of the producers they are added to. A site's channels are
a contiguous range of each module; when a shortcut, a split or a channel slice
cuts a producer's output channels into parts, each part is its own site, named
``producer[start:end]``. An inline ``F.pad`` of the channel dimension cannot be
rebuilt and stops the site.

Every Linear/Conv layer that is neither in a site nor pruned with one is
reported with the reason (Conv1d/Conv3d/ConvTranspose included); nothing is
half-pruned. A Parameter shared by two modules (tied weights) stops the sites
that reach it, with the reason.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from subprune.attention import attention_inputs, confirm, head_parameters
from subprune.calibration import forward
from subprune.convs import conv_kind
from subprune.graph import (
    ADDITIONS,
    DIVISIONS,
    LAYERS,
    PRODUCTS,
    TraceError,
    is_shape_read,
    map_dim,
    part_shapes,
    tensor_inputs,
    trace,
)
from subprune.graph import shape as _shape
from subprune.shortcuts import ZeroPadShortcut

__all__ = ["NothingToPruneError", "PrunedModelError", "TraceError", "UnprunableLayerError", "find_sites",
           "select_sites", "trace"]

PRODUCERS = (nn.Linear, nn.Conv2d)

CHANNELWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Softplus, nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
# Modules acting on each channel's spatial map alone (the channels must be on dim 1).
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d,
)
# Per-sample scalings from torchvision and timm (identity in eval mode), matched by class name.
CHANNELWISE_MODULE_NAMES = {"StochasticDepth", "DropPath", "DropBlock2d"}
# Matched by name: torch.relu, F.relu and torch.nn.functional's dispatch wrappers
# (F.max_pool2d traces as `_max_pool2d` or `max_pool2d`) all count.
CHANNELWISE_FUNCTIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "mish", "dropout", "softplus", "celu", "selu", "abs", "neg", "exp", "sqrt", "rsqrt", "square",
    "clamp", "clip", "sign", "erf", "log", "reciprocal", "_assert_scalar",
}
SPATIAL_FUNCTIONS = {
    "max_pool1d", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "_adaptive_max_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
}
CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "to",
    "type_as", "abs", "neg", "exp", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max", "square", "sign",
    "pow", "__pow__", "reciprocal", "erf",
}
_RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
_PERMUTES = {"permute", "transpose", "swapaxes", "movedim"}
_MEANS = {"mean", "amax", "amin", "sum", "norm", "vector_norm"}
_SPLITS = {"split", "chunk", "unbind", "tensor_split"}
_NORMS = {"batch_norm": 1, "layer_norm": -1, "group_norm": 1, "instance_norm": 1}  # function -> channel dim


class UnprunableLayerError(ValueError):
    """A layer the user asked to prune is not the producer of any pruning site."""


class NothingToPruneError(ValueError):
    """The model has no pruning site at all."""


class PrunedModelError(RuntimeError):
    """The pruned model does not run (its forward fixes a width that pruning changed)."""
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
class ParameterRange:
    """Entries of a parameter or buffer that a site removes (a functional norm's weights, LayerScale, an embedding).

    Attributes
    ----------
    name : str
        Qualified name of the parameter or buffer (``"blocks.0.ls1.gamma"``).
    axis : int
        Its dimension that holds the channels.
    start, span : int
        As in :class:`ChannelRange`.
    """

    name: str
    axis: int
    start: int
    span: int


@dataclass(frozen=True)
class SizeEntry:
    """An entry of a module's list of split sizes (``torch.split(x, self.splits, 1)``) that a site shrinks.

    Attributes
    ----------
    module, attribute : str
        The module whose forward splits, and its attribute holding the sizes.
    index : int
        The part the site's channels lie in.
    width : int
        Indices per unit of the site.
    """

    module: str
    attribute: str
    index: int
    width: int


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
    parameters : tuple of ParameterRange
        Parameters and buffers read by graph operations (functional norms, per-channel
        scales, embeddings, a class token) whose entries are sliced with the channels.
    renormalised : tuple of str
        Norm operations (LayerNorm over the channels, GroupNorm with one group) whose
        statistics over the kept channels differ from the dense model's: the cut model
        is not the masked dense model there, and the refit absorbs the change.
    heads : tuple of str
        Attention modules whose heads are the site's units (:mod:`subprune.attention`):
        their ``num_heads`` (and ``attn_dim``) shrink with the cut.
    sizes : tuple of SizeEntry
        Split sizes held by module attributes (MixNet's ``splits``) that shrink with the cut.
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
    parameters: tuple[ParameterRange, ...] = ()
    renormalised: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    sizes: tuple[SizeEntry, ...] = ()

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
    """A Linear/Conv layer that cannot be pruned, and why."""

    name: str
    reason: str



class _Fail(Exception):
    """The flood fill met something it cannot prune through (internal)."""


class _Split(Exception):
    """The site's channels straddle a boundary (data | zero padding, split parts): flood the parts apart (internal)."""

    def __init__(self, units: list[int], where: str, needs_coupled: bool = False):
        super().__init__(units)
        self.units, self.where, self.needs_coupled = units, where, needs_coupled


class _Regroup(Exception):
    """A grouped convolution or GroupNorm needs the site's unit to be one of its groups (internal)."""

    def __init__(self, groups: int):
        super().__init__(groups)
        self.groups = groups


# (offset, width, columns, dim): the site's n units of ``width`` indices each start at ``offset`` along
# dimension ``dim``; along it every index spans ``columns`` entries (> 1 after a flatten).
State = tuple[int, int, int, int]


class _Graph:
    """Facts about the traced graph that every flood fill reads, computed once."""

    def __init__(self, graph_module: torch.fx.GraphModule, model: nn.Module, leaf_modules: Iterable[str]):
        self.graph_module = graph_module
        self.modules = dict(graph_module.named_modules())
        self.model_modules = dict(model.named_modules())  # also those the graph traced through
        self.leaf_modules = tuple(leaf_modules)
        self.call_counts: dict[str, int] = {}
        self.data: set[torch.fx.Node] = set()  # nodes computed from the input's values
        self.conv_kinds: dict[str, str | None] = {}
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                self.call_counts[node.target] = self.call_counts.get(node.target, 0) + 1
                module = self.modules[node.target]
                if isinstance(module, nn.Conv2d) and node.target not in self.conv_kinds:
                    self.conv_kinds[node.target] = conv_kind(module, _shape(node.args[0]) or ())
            reads_data = not is_shape_read(node) and any(i in self.data for i in tensor_inputs(node))
            if node.op == "placeholder" or reads_data:
                self.data.add(node)
        self.order = {n.target: i for i, n in enumerate(graph_module.graph.nodes)
                      if n.op in ("call_module", "get_attr")}
        # Parameters reachable under two names (tied weights): name -> the other name.
        self.tied: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in first and first[id(param)] != name:
                self.tied[name] = first[id(param)]
                self.tied.setdefault(first[id(param)], name)
            first.setdefault(id(param), name)

    def tied_reason(self, module: str | None = None, parameter: str | None = None) -> str | None:
        names = [parameter] if parameter else [f"{module}.{p}" for p, _ in
                                                self.modules[module].named_parameters(recurse=False)]
        for name in names:
            if name in self.tied:
                return (f"'{name}' is tied to '{self.tied[name]}' (one Parameter in two places): pruning one would "
                        "untie them; tied parameters are not pruned")
        return None


def _describe(node: torch.fx.Node) -> str:
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class _Flood:
    """Flood fill of one channel set from a producer (see the module docstring)."""

    def __init__(self, graph: _Graph, start: torch.fx.Node, units: int, width: int, offset: int = 0):
        self.g = graph
        self.n = units
        self.state: dict[torch.fx.Node, State] = {}
        self.producers: dict[str, ChannelRange] = {}
        self.consumers: dict[str, ChannelRange] = {}
        self.sliced: dict[str, ChannelRange] = {}
        self.params: dict[str, ParameterRange] = {}
        self.groupwise: list[str] = []
        self.coupled_by: list[str] = []
        self.renormalised: list[str] = []
        self.sizes: dict[tuple[str, str, int], SizeEntry] = {}
        self.zero_pads: dict[tuple[str, str], ZeroPadRange] = {}
        self.queue: list[torch.fx.Node] = []
        out = _shape(start)
        self._visit(start, (offset, width, 1, 1 if isinstance(self._module(start), nn.Conv2d) else len(out) - 1))
        while self.queue:
            node = self.queue.pop(0)
            self._backward(node)
            for user in list(node.users):
                self._forward(node, user)

    # -- classification -------------------------------------------------------------------------
    def _module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.g.modules[node.target] if node.op == "call_module" else None

    def _kind(self, node: torch.fx.Node) -> str:
        """What ``node`` does to channels: producer layers, channel-wise kinds, reshapes, joins, or "other"."""
        if node.op in ("placeholder", "output", "get_attr"):
            return node.op
        module = self._module(node)
        name = getattr(node.target, "__name__", str(node.target))
        n_inputs = len(tensor_inputs(node))
        if module is not None:
            return self._module_kind(node, module)
        if node.op == "call_function":
            target = node.target
            if target in (torch.cat, torch.concat):
                return "cat"
            if target is operator.getitem:
                return "getitem"
            if target in (torch.split, torch.chunk, torch.unbind, torch.tensor_split) or name in _SPLITS:
                return "split"
            if target in ADDITIONS | PRODUCTS | DIVISIONS or name in ("addcmul", "addcdiv"):
                return "join" if n_inputs >= 2 else "unary"
            if name in _NORMS:
                return "norm"
            if name in CHANNELWISE_FUNCTIONS and n_inputs == 1:
                return "unary"
            if name in SPATIAL_FUNCTIONS and n_inputs == 1:
                return "spatial"
            if name == "pad" and n_inputs == 1:
                return "pad"
            if target in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
                return "reshape"
            if target in (torch.permute, torch.transpose, torch.swapaxes):
                return "permute"
            if name in _MEANS and n_inputs == 1:
                return "mean"
            if name == "roll":
                return "roll"
            return "other"
        if node.op == "call_method":
            target = node.target
            if target in _SPLITS:
                return "split"
            if target.strip("_") in ("add", "sub", "mul", "div", "truediv", "addcmul", "addcdiv"):
                return "join" if n_inputs >= 2 else "unary"
            if target in ("reshape_as", "view_as"):
                return "reshape"
            if target in CHANNELWISE_METHODS:
                return "unary"
            if target in _RESHAPES:
                return "reshape"
            if target in _PERMUTES and target != "movedim":
                return "permute"
            if target in ("expand", "expand_as"):
                return "expand"
            if target in _MEANS and n_inputs == 1:
                return "mean"
            if target == "roll":
                return "roll"
        return "other"

    def _module_kind(self, node: torch.fx.Node, module: nn.Module) -> str:
        counts = self.g.call_counts.get(node.target, 0)
        if isinstance(module, ZeroPadShortcut):
            if counts > 1:
                raise _Fail(f"shortcut '{node.target}' is called {counts} times")
            return "zeropad"
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if stateful and counts > 1:
            raise _Fail(f"module '{node.target}' is called {counts} times")
        if node.target in self.g.leaf_modules:
            raise _Fail(f"its channels reach the leaf module '{node.target}', which is kept whole")
        if isinstance(module, nn.Conv2d):
            if self.g.conv_kinds.get(node.target) is None:
                raise _Fail(f"{type(module).__name__} '{node.target}' is a Conv2d subclass whose forward is neither a "
                            "plain nor a 'SAME'-padded convolution of its input (weight standardisation?); write it "
                            "as nn.Conv2d, or prune subprune.convs.freeze_conv_weights(model, example)[0], which holds "
                            "the plain convolution a weight-standardised one computes")
            return "conv" if module.groups == 1 else "groupwise"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, LAYERS):
            raise _Fail(f"{type(module).__name__} '{node.target}' reads or writes the channels; only Linear and "
                        "Conv2d layers are pruned so far")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "batchnorm"
        if isinstance(module, CHANNELWISE_MODULES) or type(module).__name__ in CHANNELWISE_MODULE_NAMES:
            return "unary"
        if isinstance(module, SPATIAL_MODULES):
            return "spatial"
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return "reshape"
        return "other"

    # -- traversal ------------------------------------------------------------------------------
    def _visit(self, node: torch.fx.Node, state: State) -> None:
        if node in self.state:
            if self.state[node] != state:
                raise _Fail(f"its channels reach {_describe(node)} at two different positions")
            return
        offset, width, columns, dim = state
        kind = self._kind(node)
        span = self.n * width
        if kind in ("conv", "batchnorm", "groupwise") and (columns != 1 or dim != 1):
            raise _Fail(f"module '{node.target}' reads flattened or moved channels")
        if kind == "linear" and dim == len(_shape(node)) - 1:
            kind = "producer"
            if columns != 1:
                raise _Fail(f"module '{node.target}' reads flattened channels")
        if kind in ("conv", "producer", "batchnorm", "groupwise"):
            reason = self.g.tied_reason(module=node.target)
            if reason:
                raise _Fail(reason)
        if kind in ("conv", "producer"):
            self.producers[node.target] = ChannelRange(node.target, offset, span)
        elif kind == "batchnorm":
            self.sliced[node.target] = ChannelRange(node.target, offset, span)
        elif kind == "groupwise":
            self.groupwise.append(node.target)
        elif kind == "get_attr":
            reason = self.g.tied_reason(parameter=node.target)
            if reason or columns != 1:
                raise _Fail(reason or f"the parameter '{node.target}' is read flattened")
            self.params[node.target] = ParameterRange(node.target, dim, offset, span)
        self.state[node] = state
        self.queue.append(node)

    def _forward(self, node: torch.fx.Node, user: torch.fx.Node) -> None:
        """``user`` reads ``node``'s channels."""
        if is_shape_read(user):
            return
        state = self.state[node]
        offset, width, columns, dim = state
        kind = self._kind(user)
        if kind == "output":
            raise _Fail("its outputs are the model's outputs (last layer)")
        if kind in ("conv", "linear"):
            if user.args[0] is not node or len(tensor_inputs(user)) != 1:
                raise _Fail(f"layer '{user.target}' reads the channels in an unsupported way")
            module, in_shape = self._module(user), _shape(node)
            if kind == "linear" and dim != len(in_shape) - 1:  # acts on another dimension: channel-wise
                self._visit(user, state)
                return
            if user.target in self.consumers:
                raise _Fail(f"consumer '{user.target}' reads the channels twice")
            reason = self.g.tied_reason(module=user.target)
            if reason:
                raise _Fail(reason)
            if kind == "conv":
                if columns != 1 or dim != 1:
                    raise _Fail(f"consumer '{user.target}' is a Conv2d after a flatten or a permute")
                if module.padding_mode != "zeros":
                    raise _Fail(f"consumer '{user.target}' uses padding_mode={module.padding_mode!r}")
                kernel = module.kernel_size[0] * module.kernel_size[1]
            else:
                if columns != 1 and len(in_shape) != 2:
                    raise _Fail(f"Linear consumer '{user.target}' reads flattened channels of a {len(in_shape)}-D "
                                "tensor")
                kernel = columns
            self.consumers[user.target] = ChannelRange(user.target, offset, self.n * width, kernel)
            return
        new = self._through(user, node, state, kind, forward=True)
        if new is not None:
            self._visit(user, new)

    def _backward(self, node: torch.fx.Node) -> None:
        """The inputs of ``node`` that carry the same channels (unless ``node`` is a producer)."""
        kind = self._kind(node)
        state = self.state[node]
        if kind in ("conv", "get_attr"):
            return
        if kind == "linear":
            if state[3] == len(_shape(node)) - 1:
                return  # a producer
            self._visit(node.args[0], state)
            return
        if kind == "placeholder":
            raise _Fail("its channels are tied to the model input")
        if kind == "cat":
            self._backward_cat(node)
            return
        if kind == "zeropad":
            self._backward_zeropad(node)
            return
        if kind == "getitem" and part_shapes(node.args[0]) is not None:
            self._visit(node.args[0], self._part(node, state, forward=False))
            return
        for source in tensor_inputs(node):
            new = self._through(node, source, state, kind, forward=False)
            if new is not None:
                self._visit(source, new)

    def _backward_cat(self, node: torch.fx.Node) -> None:
        offset, width, columns, dim = self.state[node]
        sources = [s for s in node.args[0]]
        if self._cat_dim(node) != dim:  # along another dimension: every input carries the channels
            self._note_coupling(node, sources)
            for source in sources:
                self._visit(source, (offset, width, columns, dim))
            return
        before = 0
        for source in sources:
            size = _shape(source)[dim]
            if before <= offset and offset + self.n * width <= before + size:
                self._visit(source, (offset - before, width, columns, dim))
                return
            before += size
        raise _Fail(f"its channels straddle the inputs of the concatenation {_describe(node)}")

    def _backward_zeropad(self, node: torch.fx.Node) -> None:
        """Output channels of a ZeroPadShortcut: its zero channels, or its input's channels shifted by ``front``."""
        offset, width, columns, dim = self.state[node]
        module, (source,) = self._module(node), tensor_inputs(node)
        size, end = _shape(source)[1], offset + self.n * width
        data = (module.front, module.front + size)
        if end <= data[0] or offset >= data[1]:
            side = "front" if end <= data[0] else "back"
            self.zero_pads[(node.target, side)] = ZeroPadRange(node.target, side, self.n * width)
            return
        if data[0] <= offset and end <= data[1]:
            self._visit(source, (offset - data[0], width, columns, dim))
            return
        cuts = [b for b in data if offset < b < end]
        if width != 1 or columns != 1:
            raise _Fail(f"its channels straddle the zero padding of the shortcut '{node.target}'")
        raise _Split([b - offset for b in cuts], node.target, needs_coupled=True)

    # -- one operation ----------------------------------------------------------------------------
    def _through(self, node: torch.fx.Node, source: torch.fx.Node, state: State, kind: str,
                 forward: bool) -> State | None:
        """State of ``node`` from that of its input ``source`` (forward) or the reverse; None: not carried."""
        offset, width, columns, dim = state
        if kind in ("unary", "batchnorm", "linear"):
            if node.op == "call_method" and node.args[0] is not source:
                return None  # x.to(y), x.type_as(y): only y's dtype is read
            return state
        if kind in ("spatial", "pad", "roll"):
            self._check_spatial(node, kind, dim, columns)
            return state
        if kind == "norm":
            return self._through_norm(node, source, state, forward)
        if kind == "mean":
            return self._through_mean(node, state, forward)
        if kind == "reshape":
            if node.args[0] is not source:
                return None  # reshape_as(y) reads only y's shape
            src, dst = (_shape(source), _shape(node)) if forward else (_shape(node), _shape(source))
            mapped = map_dim(src, dst, dim, columns) if src is not None and dst is not None else None
            if mapped is None:
                raise _Fail(f"{_describe(node)} reshapes the channels in an unsupported way")
            return offset, width, mapped[1], mapped[0]
        if kind == "permute":
            perm = self._permutation(node)
            return offset, width, columns, perm.index(dim) if forward else perm[dim]
        if kind == "expand":
            if node.args[0] is not source:
                return None  # expand_as(y) reads only y's shape
            diff = len(_shape(node)) - len(_shape(source))
            if not forward and dim - diff < 0:
                raise _Fail(f"{_describe(node)} broadcasts the channels")
            return offset, width, columns, dim + diff if forward else dim - diff
        if kind == "join":
            return self._through_join(node, source, state, forward)
        if kind == "cat":  # forward only; the backward case is in _backward_cat
            if self._cat_dim(node) != dim:
                self._note_coupling(node, list(node.args[0]))
                return state
            sources = list(node.args[0])
            if columns != 1:
                raise _Fail(f"its channels are concatenated flattened by {_describe(node)}")
            if sources.count(source) != 1:
                raise _Fail(f"the concatenation {_describe(node)} reads the same channels twice")
            before = sum(_shape(s)[dim] for s in sources[: sources.index(source)])
            return offset + before, width, columns, dim
        if kind == "getitem":
            if part_shapes(source) is not None:
                return self._part(node, state, forward=True)
            return self._through_index(node, state, forward)
        if kind == "split":  # the tuple holds the input's channels; a getitem picks its part
            if self._split_dim(node) == dim and columns != 1:
                raise _Fail(f"{_describe(node)} splits flattened channels")
            return state
        if kind == "zeropad":  # forward only; the backward case is in _backward_zeropad
            if columns != 1 or dim != 1 or len(_shape(source) or ()) != 4:
                raise _Fail(f"shortcut '{node.target}' reads flattened channels")
            return offset + self._module(node).front, width, columns, dim
        if kind == "groupwise":
            module = self._module(node)
            groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
            if self.n != groups:
                raise _Regroup(groups)
            if offset != 0 or self.n * width != (c_in if forward else c_out):
                raise _Fail(f"grouped convolution '{node.target}' reads other channels besides the site's")
            if module.padding_mode != "zeros":
                raise _Fail(f"grouped convolution '{node.target}' uses padding_mode={module.padding_mode!r}")
            return 0, (c_out if forward else c_in) // groups, 1, 1
        if kind == "other" and node.op == "call_module":
            raise _Fail(f"unsupported module {type(self._module(node)).__name__} '{node.target}' on the channels")
        raise _Fail(f"unsupported operation {_describe(node)} on the channels")

    def _check_spatial(self, node: torch.fx.Node, kind: str, dim: int, columns: int) -> None:
        """Pooling, resizing, padding and rolling must leave the channel dimension alone."""
        if kind == "spatial" and (dim != 1 or columns != 1):
            raise _Fail(f"{_describe(node)} pools or resizes a tensor whose channels are not on dim 1")
        if kind == "roll":
            dims = _arg(node, 2, "dims")
            ndim = len(_shape(node))
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if not dims or dim in [d % ndim for d in dims]:
                raise _Fail(f"{_describe(node)} rolls the channels")
        if kind == "pad":
            pad = tuple(_arg(node, 1, "pad", ()))
            ndim = len(_shape(node.args[0]))
            for i in range(len(pad) // 2):
                if ndim - 1 - i == dim and (pad[2 * i] or pad[2 * i + 1]):
                    raise _Fail(f"'{node.name}' (pad) zero-pads the channel dimension (e.g. an option-A shortcut) "
                                "by amounts fixed in forward(); write the shortcut as "
                                "subprune.shortcuts.ZeroPadShortcut to prune through it")

    def _through_norm(self, node: torch.fx.Node, source: torch.fx.Node, state: State, forward: bool) -> State:
        offset, width, columns, dim = state
        function = getattr(node.target, "__name__", str(node.target))
        data = node.args[0]
        channel_dim = 1 if _NORMS[function] == 1 else len(_shape(data)) - 1
        if source is not data:  # a weight, bias or running statistic: its dim 0 holds the channels
            return (offset, width, 1, channel_dim) if forward else (offset, width, 1, 0)
        if dim != channel_dim or columns != 1:
            raise _Fail(f"{_describe(node)} normalises a tensor whose channels are not on its channel dimension")
        attrs = [a for a in (*node.args[1:], *node.kwargs.values())
                 if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        owner = attrs[0].target.rpartition(".")[0] if attrs else node.name
        if function == "layer_norm":
            if len(tuple(_arg(node, 1, "normalized_shape"))) != 1:
                raise _Fail(f"{_describe(node)} normalises over the channels and other dimensions together")
            self._renormalise(owner or node.name)
        elif function == "group_norm":
            groups = _arg(node, 1, "num_groups")
            if groups == 1:
                self._renormalise(owner or node.name)
            elif self.n != groups:
                raise _Regroup(groups)
            elif offset != 0 or self.n * width != _shape(data)[1]:
                raise _Fail(f"GroupNorm {_describe(node)} reads other channels besides the site's")
        return state

    def _renormalise(self, name: str) -> None:
        if name not in self.renormalised:
            self.renormalised.append(name)

    def _through_mean(self, node: torch.fx.Node, state: State, forward: bool) -> State | None:
        offset, width, columns, dim = state
        ndim = len(_shape(node.args[0]))
        is_norm = getattr(node.target, "__name__", node.target) in ("norm", "vector_norm")
        dims = _arg(node, 2, "dim") if is_norm else _arg(node, 1, "dim")
        if dims is None or columns != 1:
            raise _Fail(f"{_describe(node)} reduces over the channels")
        dims = sorted({d % ndim for d in ([dims] if isinstance(dims, int) else dims)})
        keep = bool(_arg(node, 3 if is_norm else 2, "keepdim", False))
        kept_dims = list(range(ndim)) if keep else [d for d in range(ndim) if d not in dims]
        if forward:
            if dim in dims:
                mean = getattr(node.target, "__name__", node.target) == "mean"
                if mean and keep and dims == [dim]:  # a statistic of all channels (ConvNeXt-V2's GRN): it changes
                    self._renormalise(node.name)
                    return None
                raise _Fail(f"{_describe(node)} reduces over the channels")
            return offset, width, columns, kept_dims.index(dim)
        if kept_dims[dim] in dims:
            raise _Fail(f"{_describe(node)} reduces over the channels")
        return offset, width, columns, kept_dims[dim]

    def _through_join(self, node: torch.fx.Node, source: torch.fx.Node, state: State, forward: bool) -> State | None:
        """Elementwise arithmetic of two tensors, broadcast from the right."""
        offset, width, columns, dim = state
        out, src = _shape(node), _shape(source)
        shift = len(out) - len(src)
        if forward:
            if out[dim + shift] != src[dim]:
                raise _Fail(f"its channels are broadcast by {_describe(node)}")
            self._note_coupling(node, tensor_inputs(node), dim + shift)
            return offset, width, columns, dim + shift
        if dim - shift < 0 or (src[dim - shift] == 1 and out[dim] != 1):
            return None  # the same value for every channel (a spatial mask, a scalar)
        if src[dim - shift] != out[dim]:
            raise _Fail(f"its channels are combined with a tensor of another shape by {_describe(node)}")
        self._note_coupling(node, tensor_inputs(node), dim)
        return offset, width, columns, dim - shift

    def _note_coupling(self, node: torch.fx.Node, inputs: list[torch.fx.Node], dim: int | None = None) -> None:
        """Two activations carrying the same channels tie their producers; a gate or a parameter does not."""
        if node.name in self.coupled_by:
            return
        out = _shape(node)
        carriers = []
        for source in inputs:
            src = _shape(source)
            if dim is None or (dim - (len(out) - len(src)) >= 0 and src[dim - (len(out) - len(src))] == out[dim]):
                carriers.append(source)
        data = [s for s in carriers if s in self.g.data]
        if len(data) < 2:
            return  # a parameter, a constant or a single activation
        gate = node.target in PRODUCTS or node.target in ("mul", "mul_")
        if gate and dim is not None and any(math.prod(_shape(s)) == _shape(s)[0] * out[dim] for s in data):
            return  # squeeze-and-excitation: (N, C, 1, 1) scales (N, C, H, W)
        self.coupled_by.append(node.name)

    def _through_index(self, node: torch.fx.Node, state: State, forward: bool) -> State | None:
        """x[...] on a tensor: basic indexing that keeps the channels (a slice of them cuts the site)."""
        offset, width, columns, dim = state
        in_shape = _shape(node.args[0])
        if in_shape is None:  # a part of a module's tuple output (nn.MultiheadAttention returns (out, weights))
            source = node.args[0]
            module = self._module(source) if isinstance(source, torch.fx.Node) else None
            what = f"{type(module).__name__} '{source.target}'" if module is not None else _describe(source)
            raise _Fail(f"its channels reach the output of {what}, which is not one tensor: no site follows "
                        "channels through it")
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, (torch.fx.Node, list, Tensor)) for i in index):
            raise _Fail(f"{_describe(node)} indexes the tensor with another tensor")
        explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list = []
        for i in index:
            expanded.extend([slice(None)] * (len(in_shape) - explicit) if i is Ellipsis else [i])
        expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
        in_to_out, out_dim, in_dim, cuts = {}, 0, 0, {}
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if isinstance(i, slice):
                in_to_out[in_dim] = out_dim
                out_dim += 1
            elif in_dim == (dim if forward else None):
                raise _Fail(f"{_describe(node)} selects single channels")
            if isinstance(i, slice) and i != slice(None):
                cuts[in_dim] = i
            in_dim += 1
        channel_in = dim if forward else next((d for d, o in in_to_out.items() if o == dim), None)
        if channel_in is None:
            raise _Fail(f"{_describe(node)} selects single channels")
        start = 0
        if channel_in in cuts:
            if columns != 1:
                raise _Fail(f"{_describe(node)} slices flattened channels")
            start, stop, step = cuts[channel_in].indices(in_shape[channel_in])
            if step != 1:
                raise _Fail(f"{_describe(node)} takes every {step}th channel")
            fixed = stop < in_shape[channel_in]  # the slice ends before the last channel: a bound set in forward()
            if forward:
                return self._cut(node, state, start, stop - start, channel_in, in_to_out[channel_in], fixed)
            self._check_fixed(node, start, fixed)
        if forward:
            return offset, width, columns, in_to_out[channel_in]
        return offset + start, width, columns, channel_in

    def _cut(self, node: torch.fx.Node, state: State, start: int, size: int, dim: int, new_dim: int,
             fixed: bool) -> State | None:
        """The site's channels through a part [start, start + size) of their dimension (a slice or a split).

        ``fixed``: the part ends at a position that forward() fixes (a slice bound,
        a split size): pruning channels at or before it would move it.
        """
        offset, width, columns, _ = state
        end = offset + self.n * width
        if end <= start or offset >= start + size:
            return None  # this part does not hold the site's channels
        if start <= offset and end <= start + size:
            self._check_fixed(node, start, fixed)
            return offset - start, width, columns, new_dim
        if width != 1 or columns != 1:
            raise _Fail(f"its channels straddle the parts of {_describe(node)}")
        raise _Split([b - offset for b in (start, start + size) if offset < b < end], node.name)

    @staticmethod
    def _check_fixed(node: torch.fx.Node, start: int, fixed: bool) -> None:
        if fixed:
            raise _Fail(f"{_describe(node)} cuts the channels at a position fixed in forward() (a slice bound or "
                        "split size): pruning them would shift it; only the part that runs to the last channel "
                        "can be pruned")

    def _split_dim(self, node: torch.fx.Node) -> int:
        name = node.target if isinstance(node.target, str) else node.target.__name__
        index = 1 if name == "unbind" else 2
        return _arg(node, index, "dim", 0) % len(_shape(node.args[0]))

    def _part(self, node: torch.fx.Node, state: State, forward: bool) -> State | None:
        """getitem(split, i): the part i of a split/chunk/unbind of the channels' tensor."""
        split, i = node.args[0], node.args[1]
        offset, width, columns, dim = state
        split_dim = self._split_dim(split)
        removes = (split.target if isinstance(split.target, str) else split.target.__name__) == "unbind"
        parts = part_shapes(split)
        if isinstance(i, int):
            i %= len(parts)  # spx[-1] (Res2Net's pass-through part) is the last part
        sizes = [1] * len(parts) if removes else [p[split_dim] for p in parts]
        start = sum(sizes[:i])
        # Only split(x, size) keeps its earlier parts when the channels shrink (the last takes the rest);
        # chunk(x, k) recomputes every size and split(x, [sizes]) fixes them all.
        name = split.target if isinstance(split.target, str) else split.target.__name__
        sizes_arg = _arg(split, 1, "split_size_or_sections", _arg(split, 1, "split_size"))
        fixed = not (name == "split" and isinstance(sizes_arg, int) and i == len(parts) - 1)
        if fixed and split_dim == dim and name == "split" and isinstance(sizes_arg, (list, tuple)):
            owner = self._size_attribute(split, list(sizes_arg))  # split(x, self.splits): the list can shrink
            if owner is not None:
                end = offset + self.n * width  # forward: relative to the split's input; backward: to the part
                if not forward or (start <= offset and end <= start + sizes[i]):
                    self.sizes[(*owner, i)] = SizeEntry(*owner, i, width)
                    fixed = False
        if forward:
            if split_dim == dim:
                if removes:
                    raise _Fail(f"{_describe(split)} unbinds the channels")
                return self._cut(split, state, start, sizes[i], dim, dim, fixed)
            return offset, width, columns, dim - 1 if removes and split_dim < dim else dim
        if removes:
            return offset, width, columns, dim + 1 if split_dim <= dim else dim
        if split_dim == dim:
            self._check_fixed(split, start, fixed)
        return (offset + start if split_dim == dim else offset), width, columns, dim

    def _size_attribute(self, node: torch.fx.Node, value: list) -> tuple[str, str] | None:
        """(module, attribute) holding ``value`` in the module whose forward made ``node``, if exactly one does."""
        stack = list(node.meta.get("nn_module_stack", {}))
        if not stack or stack[-1] not in self.g.model_modules:
            return None
        owner = self.g.model_modules[stack[-1]]
        names = [k for k, v in vars(owner).items() if isinstance(v, (list, tuple)) and list(v) == value]
        return (stack[-1], names[0]) if len(names) == 1 else None

    def _cat_dim(self, node: torch.fx.Node) -> int:
        return _arg(node, 1, "dim", 0) % len(_shape(node))

    def _permutation(self, node: torch.fx.Node) -> list[int]:
        """Output dim i holds input dim perm[i]."""
        ndim = len(_shape(node))
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        if node.target in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
            a, b = (d % ndim for d in args[:2])
            perm = list(range(ndim))
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return [d % ndim for d in dims]


def _flood_site(graph: _Graph, node: torch.fx.Node, coupled: bool, start: int = 0, span: int | None = None):
    """Flood from output channels ``start .. start + span - 1`` of a producer node.

    Returns (PruningSite, producer ranges, grouped convs) or (reason, touched modules, ()); raises
    _Split when the channels must be flooded in parts.
    """
    module = graph.modules[node.target]
    channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    span = channels if span is None else span
    units, tried, flood = span, set(), None
    for _ in range(4):
        try:
            flood = _Flood(graph, node, units, span // units, start)
            break
        except _Regroup as regroup:
            if regroup.groups in tried or span % regroup.groups:
                return (f"grouped convolutions or GroupNorms with {regroup.groups} groups do not divide its "
                        f"{span} channels evenly"), set(), ()
            tried.add(regroup.groups)
            units = regroup.groups
        except _Fail as fail:
            return str(fail), set(), ()
    if flood is None:
        return "grouped convolutions or GroupNorms with incompatible numbers of groups", set(), ()
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
    order = graph.order
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
        parameters=tuple(sorted(flood.params.values(), key=lambda p: order.get(p.name, 0))),
        renormalised=tuple(flood.renormalised), sizes=tuple(flood.sizes.values()),
    )
    return site, producers, set(flood.groupwise)


def _attention_sites(model: nn.Module, example, graph: _Graph) -> tuple[dict[str, PruningSite], dict[str, str]]:
    """Head sites of the attention modules confirmed by behaviour, keyed by their qkv; reasons for the others."""
    sites, reasons = {}, {}
    for name, x in attention_inputs(model, lambda m: forward(m, example)).items():
        prefix = f"{name}." if name else ""
        qkv, proj = f"{prefix}qkv", f"{prefix}proj"
        if graph.call_counts.get(qkv) != 1 or graph.call_counts.get(proj) != 1:
            continue
        why = confirm(model.get_submodule(name), x) or graph.tied_reason(module=qkv) or graph.tied_reason(module=proj)
        if why:
            reasons[qkv] = f"the attention heads of '{name}' are not pruned: {why}"
            continue
        heads = model.get_submodule(name).num_heads
        width = model.get_submodule(proj).in_features
        tables = tuple(ParameterRange(f"{prefix}{p}", axis, 0, heads)
                       for p, axis in head_parameters(model.get_submodule(name), heads))
        sites[qkv] = PruningSite(
            name=qkv, producer=qkv, consumer=proj, batchnorms=(), channels=heads, group_size=width // heads,
            producers=tuple(ChannelRange(qkv, part * width, width) for part in range(3)),
            consumers=(ChannelRange(proj, 0, width),), heads=(name,), parameters=tables,
        )
    return sites, reasons


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
    model: nn.Module, example_input: Tensor, coupled: bool = False, leaf_modules: Iterable[str] = ()
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
    leaf_modules : iterable of str
        Submodules kept whole: not traced into, nothing inside them pruned (for
        forwards that no trace can follow, see :func:`subprune.graph.trace`).

    Returns
    -------
    sites : list of PruningSite
    skipped : list of SkippedLayer
        Every Linear/Conv layer (Conv1d, Conv3d and transposed convolutions
        included) that is neither a producer of a site nor a grouped
        convolution carried by one, with the reason.

    Raises
    ------
    TraceError
        See :func:`subprune.graph.trace`.
    """
    graph = _Graph(trace(model, example_input, leaf_modules), model, leaf_modules)
    modules, call_counts = graph.modules, graph.call_counts
    heads, head_reasons = _attention_sites(model, example_input, graph)

    sites: list[PruningSite] = []
    skipped: list[SkippedLayer] = []
    covered: set[str] = set()  # grouped convolutions carried by a site
    ranges: dict[str, list[tuple[int, int]]] = {}  # producer -> (start, span) of output channels in sites
    failed: dict[str, str] = {}  # grouped conv -> reason of the site it belongs to
    seen: set[str] = set()
    for node in graph.graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], LAYERS):
            continue
        name, module = node.target, modules[node.target]
        if name in seen:
            continue
        seen.add(name)
        if call_counts[name] > 1:
            skipped.append(SkippedLayer(name, f"called {call_counts[name]} times (shared weights)"))
            continue
        if not isinstance(module, PRODUCERS):
            skipped.append(SkippedLayer(name, f"{type(module).__name__} layers are not pruned so far (only Linear and "
                                              "Conv2d): their weight layout needs its own slicing and statistics"))
            continue
        if name in covered or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        if name in heads:
            sites.append(heads[name])
            continue
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        pieces = _uncovered(ranges.get(name, []), channels)
        while pieces:  # output channels no site holds yet; a ZeroPadShortcut or a split may cut them
            start, span = pieces.pop(0)
            try:
                found, touched, grouped = _flood_site(graph, node, coupled, start, span)
            except _Split as split:
                if split.needs_coupled and not coupled:  # zero channels are only ever tied in by a residual addition
                    skipped.append(SkippedLayer(name, (
                        f"its channels are added to the zero-padding shortcut '{split.where}' (a residual "
                        "connection); prune them together with coupled=True")))
                    break
                cuts = [start, *(start + u for u in split.units), start + span]
                pieces = [(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)] + pieces
                continue
            label = name if span == channels else f"{name}[{start}:{start + span}]"
            if isinstance(found, str):
                found = head_reasons.get(name, found)
                skipped.append(SkippedLayer(label, found))
                for other in touched:
                    failed.setdefault(other, f"its channels belong to '{label}', which is skipped: {found}")
                continue
            sites.append(found)
            covered |= grouped
            for ref in touched:
                ranges.setdefault(ref.module, []).append((ref.start, ref.span))
    skipped_names = {s.name for s in skipped}
    for node in graph.graph_module.graph.nodes:  # grouped convolutions no site carries
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Conv2d) and module.groups != 1 and node.target not in covered:
            if call_counts[node.target] == 1 and node.target not in skipped_names:
                reason = failed.get(node.target, "grouped or depthwise convolution whose channels no site carries")
                skipped.append(SkippedLayer(node.target, reason))
                skipped_names.add(node.target)
    # Layers that the traced graph never calls (inside a leaf module, or unused).
    for name, module in model.named_modules():
        if isinstance(module, LAYERS) and name not in seen and name not in skipped_names:
            leaf = next((leaf for leaf in graph.leaf_modules if name.startswith(leaf + ".")), None)
            called = next((m for m in graph.call_counts if name.startswith(m + ".")), None)  # a torch.nn leaf
            if leaf:
                reason = f"inside the leaf module '{leaf}', which is kept whole"
            elif called:
                reason = (f"inside {type(graph.modules[called]).__name__} '{called}', which the trace keeps whole "
                          "(nn.MultiheadAttention: its heads are not pruned; a Linear/Conv-built attention, as in "
                          "timm, is)")
            else:
                reason = "not called in the traced forward pass"
            skipped.append(SkippedLayer(name, reason))
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
