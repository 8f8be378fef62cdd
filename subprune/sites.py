"""Find pruning sites by tracing the model's graph with torch.fx.

A pruning site is a producer (Linear out-features or Conv2d out-channels), a
chain of channel-wise operations (BatchNorm, activations, pooling, dropout, one
flatten) and the one consumer (Linear or Conv2d) that reads the producer's
channels and whose weights are refit (DESIGN.md Sec. 2). Sites follow the data
flow of the traced graph, not the order in which modules were registered. Every
Linear/Conv2d that is not the producer of a site is reported with the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

PRODUCERS = (nn.Linear, nn.Conv2d)

CHANNELWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
# Matched by name: torch.relu, F.relu and torch.nn.functional's dispatch wrappers
# (F.max_pool2d traces as `_max_pool2d` or `max_pool2d`) all count.
CHANNELWISE_FUNCTIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh",
    "hardswish", "mish", "dropout", "max_pool2d", "_max_pool2d", "max_pool2d_with_indices",
    "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d",
}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
FLATTEN_METHODS = {"view", "reshape", "flatten"}


class UnprunableLayerError(ValueError):
    """A layer the user asked to prune is not the producer of any pruning site."""


class TraceError(ValueError):
    """The model could not be traced or run on the example input."""


@dataclass(frozen=True)
class PruningSite:
    """One producer -> channel-wise ops -> consumer chain.

    Attributes
    ----------
    name : str
        The site's name: the producer's qualified module name.
    producer : str
        Module whose output channels are removed (Linear or Conv2d).
    consumer : str
        Module whose input columns are removed and whose weight is refit.
    batchnorms : tuple of str
        BatchNorm modules between producer and consumer, sliced with the channels.
    channels : int
        n, the number of producer channels.
    group_size : int
        g, consumer input columns per channel: 1 (Linear), kh*kw (Conv2d),
        H*W (Conv2d -> flatten -> Linear). Group c is columns c*g .. c*g+g-1.
    """

    name: str
    producer: str
    consumer: str
    batchnorms: tuple[str, ...]
    channels: int
    group_size: int


@dataclass(frozen=True)
class SkippedLayer:
    """A Linear/Conv2d that cannot be pruned, and why."""

    name: str
    reason: str


def trace(model: nn.Module, example_input: Tensor) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and record tensor shapes from ``example_input``.

    Raises
    ------
    TraceError
        If torch.fx cannot trace the model (data-dependent control flow) or the
        example input does not fit the model.
    """
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types; re-raise one with the fix
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {exc}. Models with Python "
            "control flow on tensor values or shapes cannot be traced; move such checks "
            "out of forward()"
        ) from exc
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    except Exception as exc:
        raise TraceError(
            f"the model does not run on inputs of shape {tuple(example_input.shape)}: {exc}"
        ) from exc
    return graph_module


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _only_tensor_input(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """True if ``source`` is the first argument and no other argument is a graph node."""
    inputs: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
    return bool(node.args) and node.args[0] is source and all(i is source for i in inputs)


def _is_flatten(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """A flatten/view/reshape that maps (N, C, *spatial) to (N, C * prod(spatial))."""
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(before) < 3 or len(after) != 2:
        return False
    return after[0] == before[0] and after[1] == math.prod(before[1:])


def _follow(
    graph_module: torch.fx.GraphModule, producer_node: torch.fx.Node, call_counts: dict[str, int]
) -> tuple[str, tuple[str, ...], int] | str:
    """Walk from a producer to its consumer; return (consumer, batchnorms, group_size) or a reason."""
    modules = dict(graph_module.named_modules())
    batchnorms: list[str] = []
    group_size = 1
    flattened = False
    node = producer_node
    while True:
        users = list(node.users)
        if not users:
            return "its output is not used"
        if len(users) > 1:
            names = ", ".join(u.name for u in users)
            return f"its channels reach {len(users)} operations ({names}): branch or residual"
        user = users[0]
        if user.op == "output":
            return "its outputs are the model's outputs (last layer)"
        if user.op == "call_function" and user.target in (operator.add, torch.add, operator.iadd):
            return f"its channels feed an addition '{user.name}' (residual connection)"
        if user.op == "call_function" and user.target is torch.cat:
            return f"its channels are concatenated by '{user.name}'"
        if not _only_tensor_input(user, node):
            return f"its channels are combined with another tensor by '{user.name}' ({user.target})"
        if user.op == "call_module":
            module = modules[user.target]
            if call_counts.get(user.target, 0) > 1:
                return f"module '{user.target}' is called {call_counts[user.target]} times"
            if isinstance(module, PRODUCERS):
                if isinstance(module, nn.Conv2d):
                    if flattened:
                        return f"consumer '{user.target}' is a Conv2d after a flatten"
                    if module.groups != 1:
                        return f"consumer '{user.target}' is a grouped convolution"
                    if module.padding_mode != "zeros":
                        return f"consumer '{user.target}' uses padding_mode={module.padding_mode!r}"
                    group_size = module.kernel_size[0] * module.kernel_size[1]
                return user.target, tuple(batchnorms), group_size
            if isinstance(module, nn.Flatten):
                if flattened or not _is_flatten(user, node):
                    return f"'{user.target}' is not a flatten of (N, C, ...) to (N, C*...)"
                flattened, group_size = True, math.prod(_shape(node)[2:])
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if flattened:
                    return f"BatchNorm '{user.target}' after a flatten mixes channel groups"
                batchnorms.append(user.target)
            elif not isinstance(module, CHANNELWISE_MODULES):
                return f"unsupported module {type(module).__name__} '{user.target}' before a consumer"
        elif user.op == "call_function" and getattr(user.target, "__name__", "") in CHANNELWISE_FUNCTIONS:
            pass
        elif (user.op == "call_function" and user.target is torch.flatten) or (
            user.op == "call_method" and user.target in FLATTEN_METHODS
        ):
            if flattened or not _is_flatten(user, node):
                return f"'{user.name}' reshapes the channels in an unsupported way"
            flattened, group_size = True, math.prod(_shape(node)[2:])
        elif user.op == "call_method" and user.target in CHANNELWISE_METHODS:
            pass
        else:
            return f"unsupported operation '{user.name}' ({getattr(user.target, '__name__', user.target)})"
        node = user


def find_sites(
    model: nn.Module, example_input: Tensor
) -> tuple[list[PruningSite], list[SkippedLayer]]:
    """All pruning sites of ``model``, in forward (graph) order, and the skipped layers.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    example_input : Tensor
        A batch the model accepts (a few calibration samples), used to record
        tensor shapes (for the group size after a flatten).

    Returns
    -------
    sites : list of PruningSite
    skipped : list of SkippedLayer
        Every Linear/Conv2d that is not the producer of a site, with the reason.

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
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            skipped.append(SkippedLayer(name, "grouped or depthwise convolution producer"))
            continue
        found = _follow(graph_module, node, call_counts)
        if isinstance(found, str):
            skipped.append(SkippedLayer(name, found))
            continue
        consumer, batchnorms, group_size = found
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        consumer_module = modules[consumer]
        width = (
            consumer_module.in_features
            if isinstance(consumer_module, nn.Linear)
            else consumer_module.in_channels * group_size
        )
        if width != channels * group_size:
            skipped.append(
                SkippedLayer(name, f"consumer '{consumer}' reads {width} features, not {channels} x {group_size}")
            )
            continue
        sites.append(PruningSite(name, name, consumer, batchnorms, channels, group_size))
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
    reasons = {s.name: s.reason for s in skipped}
    chosen = []
    for layer in layers:
        if layer in by_name:
            chosen.append(by_name[layer])
        elif layer in reasons:
            raise UnprunableLayerError(f"layer '{layer}' cannot be pruned: {reasons[layer]}")
        else:
            raise UnprunableLayerError(
                f"layer '{layer}' is not a Linear/Conv2d of the model; prunable layers: "
                f"{', '.join(by_name) or 'none'}"
            )
    order = {s.name: i for i, s in enumerate(sites)}
    return sorted(dict.fromkeys(chosen), key=lambda s: order[s.name])
