"""The staged engine: SeqInChange and AsymInChange statistics on a traced graph in a bounded number of passes.

The per-site driver (:func:`subprune.pipeline.collect_site_statistics` called once per
site) runs the calibration set from the model's input up to each site's consumer:
about (sites / 2) full forward passes for SeqInChange and twice that for
AsymInChange (26-37x one dense forward on an EfficientNet-B0). Following the
block engine of the transformer path (:mod:`subprune.hf.engine`: embed once,
then block by block from cached inputs), this engine splits the traced graph
(torch.fx, :func:`subprune.graph.trace`) into stages at the sites and caches the
live tensors at each cut:

* nodes run in graph (topological) order; site k's *cut* c_k is the first node
  that site k or any later site changes (its producers, norms, grouped
  convolutions, consumers, sliced parameters), so nothing before c_k ever
  changes again and the tensors crossing c_k (a residual stream, a skip
  connection that spans several sites, a shape read) stay valid;
* the statistics of site k come from one run of the pruned stream from the
  previous cut c_{k-1} to site k's last consumer, which also stores the live
  tensors at c_k; for AsymInChange the dense stream runs beside it, from where
  its previous run stopped to the same consumer;
* after site k is cut (and its shared consumers refit) the next site's run
  starts from c_k in the pruned model.

Every node of the pruned stream runs about twice (once for the statistics of
the site whose stage holds it, once more after that site is cut) and every node of
the dense stream once: SeqInChange costs about 2 dense-forward equivalents,
AsymInChange about 3, whatever the number of sites. A coupled site whose
consumers lie far downstream (a residual stream read by every block) adds
one run to its last consumer, as in the per-site driver.

Caches hold the live tensors of every calibration batch at one cut, on the CPU
in the model's own dtype (so results equal the per-site driver's bit for bit):
for a CNN usually one or two feature maps per sample, for both streams.

The graph is replayed node by node on the model being pruned: modules and
parameters are looked up by name at every call, so the surgery's new modules
are used. A cut that changes a value the trace baked into the graph as a
constant (attention heads in a ``reshape``, split sizes, a LayerNorm's
``normalized_shape``, a GroupNorm's groups, a parameter read with fixed sizes:
ViT, Mixer, ConvNeXt) is followed by a *retrace* of the pruned model on the
first two calibration samples before the next stage runs
(:meth:`StagedGraph.adopt`): the new graph must have the same nodes in the same
order with the same inputs (only constants differ), and its arguments replace
the old ones for the pruned stream from then on; the dense stream keeps the
original graph. Caches stay valid, since they are keyed by node position. A
retrace costs one trace and 2-sample forward (not counted as a pass). Models
whose replayed graph does not reproduce their own output, and retraces whose
graph differs in structure, use the per-site driver instead
(:func:`staged_statistics` says why; :class:`RetraceMismatch` during a run).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from subprune.calibration import Batch, Calibration
from subprune.devices import offload_modules, to_device
from subprune.distributed import all_reduce_statistics
from subprune.graph import trace
from subprune.joint_refit import shared_consumers
from subprune.sites import PruningSite
from subprune.statistics import GramStatistics
from subprune.surgery import ChannelLayout, get_module

log = logging.getLogger(__name__)

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.ior, operator.iand, operator.ixor}
# Operations whose result may share memory with their first input (an in-place op on it changes the input).
_ALIAS_METHODS = {"view", "view_as", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
                  "permute", "expand", "expand_as", "narrow", "contiguous", "detach", "t", "chunk", "split",
                  "unbind", "movedim", "swapaxes", "select", "to", "float", "type_as", "as_strided"}
_ALIAS_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                    torch.transpose, torch.permute, torch.chunk, torch.split, torch.unbind, torch.narrow,
                    torch.movedim, torch.detach}
# Graph operations that read a sliced parameter without baking its size into the graph.
_SAFE_PARAMETER_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.imul,
                             operator.iadd, operator.isub, operator.itruediv, torch.mul, torch.add, torch.sub,
                             torch.div}
_SAFE_PARAMETER_METHODS = {"mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "__mul__", "__rmul__",
                           "__add__", "__radd__"}


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _is_inplace(node: torch.fx.Node, model: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True
    return False


def _aliases_input(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


class RetraceMismatch(RuntimeError):
    """A retrace of the pruned model does not match the first trace node for node (the per-site driver is used)."""


class StagedGraph:
    """A traced graph in topological order, with the facts the staged runs need.

    Parameters
    ----------
    graph_module : torch.fx.GraphModule
        From :func:`subprune.graph.trace` of the model to be pruned.
    model : nn.Module
        The model whose modules the graph calls (read for in-place flags).

    Attributes
    ----------
    nodes : list of torch.fx.Node
        Graph order.
    compute_nodes : int
        Nodes that compute something (call_module, call_function, call_method).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, model: nn.Module):
        self.graph_module = graph_module
        self.nodes = list(graph_module.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max([self.index[u] for u in n.users], default=self.index[n]) for n in self.nodes}
        self.free_after: dict[int, list[torch.fx.Node]] = {}
        for n, last in self.last_use.items():
            self.free_after.setdefault(last, []).append(n)
        self.calls: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.calls.setdefault(n.target, []).append(i)
        self.compute_nodes = sum(n.op in ("call_module", "call_function", "call_method") for n in self.nodes)
        self.mutated: set[torch.fx.Node] = set()  # values an in-place operation may change (through views too)
        for n in self.nodes:
            if _is_inplace(n, model) and n.args and isinstance(n.args[0], torch.fx.Node):
                source = n.args[0]
                while True:
                    self.mutated.add(source)
                    if not _aliases_input(source) or not isinstance(source.args[0], torch.fx.Node):
                        break
                    source = source.args[0]
        self.output = next(i for i, n in enumerate(self.nodes) if n.op == "output")
        self.pruned_arguments: list[tuple[tuple, dict]] | None = None  # set by adopt(): the pruned stream's args
        self.retraces = 0

    def arguments(self, i: int, stream: str) -> tuple[tuple, dict]:
        """(args, kwargs) of node ``i`` for ``stream``: the latest retrace's for "pruned", the trace's otherwise."""
        if stream == "pruned" and self.pruned_arguments is not None:
            return self.pruned_arguments[i]
        node = self.nodes[i]
        return node.args, node.kwargs

    def adopt(self, graph_module: torch.fx.GraphModule) -> None:
        """Use the arguments of a retrace of the pruned model for the pruned stream.

        The retraced graph must hold the same nodes in the same order (name, op,
        target) reading the same nodes; only constants in the arguments (a head
        count, a normalised shape, split sizes) may differ. Its node references
        are mapped onto this graph's nodes, so caches and schedules stay valid.

        Raises
        ------
        RetraceMismatch
            If the retraced graph differs in anything but constants.
        """
        nodes = list(graph_module.graph.nodes)
        if len(nodes) != len(self.nodes):
            raise RetraceMismatch(f"the retraced graph has {len(nodes)} nodes, the first trace {len(self.nodes)}")
        position = {n: i for i, n in enumerate(nodes)}
        arguments = []
        for old, new in zip(self.nodes, nodes, strict=True):
            if (old.name, old.op, old.target) != (new.name, new.op, new.target):
                raise RetraceMismatch(f"node '{old.name}' ({old.op} {old.target}) is '{new.name}' ({new.op} "
                                      f"{new.target}) in the retraced graph")
            args, kwargs = torch.fx.node.map_arg((new.args, new.kwargs), lambda n: self.nodes[position[n]])
            reads_old: list[torch.fx.Node] = []
            reads_new: list[torch.fx.Node] = []
            torch.fx.node.map_arg((old.args, old.kwargs), reads_old.append)
            torch.fx.node.map_arg((args, kwargs), reads_new.append)
            if reads_old != reads_new:
                raise RetraceMismatch(f"node '{old.name}' reads other values in the retraced graph")
            arguments.append((args, kwargs))
        self.pruned_arguments = arguments
        self.retraces += 1

    def live(self, cut: int) -> list[torch.fx.Node]:
        """Values computed before node ``cut`` and read at or after it (parameters excluded: read when used)."""
        return [n for n in self.nodes[:cut] if n.op != "get_attr" and self.last_use[n] >= cut]

    def touched(self, site: PruningSite) -> list[int]:
        """Indices of the nodes whose module or parameters the cut of ``site`` changes."""
        modules = {r.module for r in (*site.producers, *site.consumers, *site.sliced)}
        modules |= set(site.groupwise) | {z.module for z in site.zero_pads} | set(site.heads)
        modules |= {s.module for s in site.sizes}
        found = [i for m in modules for i in self.calls.get(m, [])]
        parameters = {p.name for p in site.parameters}
        for n in self.nodes:
            if n.op == "get_attr" and n.target in parameters:
                found.extend(self.index[u] for u in n.users)
        return found

    def baked_constant(self, site: PruningSite) -> str | None:
        """Why cutting ``site`` changes a value the trace baked into the graph, or None when nothing does.

        Such a cut is followed by a retrace of the pruned model (:meth:`adopt`).
        """
        if site.heads:
            return f"it cuts attention heads of {site.heads[0]} (the head count is a constant of the graph)"
        if site.sizes:
            return f"it shrinks split sizes of {site.sizes[0].module} (constants of the graph)"
        if site.renormalised:
            return f"it slices the norm {site.renormalised[0]} (its shape is a constant of the graph)"
        parameters = {p.name for p in site.parameters}
        for n in self.nodes:
            if n.op != "get_attr" or n.target not in parameters:
                continue
            for user in n.users:
                safe = (user.op == "call_function" and (user.target in _SAFE_PARAMETER_FUNCTIONS
                                                        or "batch_norm" in getattr(user.target, "__name__", ""))
                        ) or (user.op == "call_method" and user.target in _SAFE_PARAMETER_METHODS)
                if not safe:
                    return f"'{user.name}' reads the sliced parameter {n.target} with sizes fixed in the graph"
        return None


@dataclass
class _Cache:
    """The live values at one cut, for every calibration batch (tensors on the CPU)."""

    index: int
    values: list[dict[torch.fx.Node, Any]]


@dataclass
class StagedCounts:
    """What the staged runs executed.

    Attributes
    ----------
    runs : dict stream -> int
        Batch runs of each stream ("pruned", "dense").
    node_samples : dict stream -> int
        Graph nodes executed times the samples of their batch, per stream.
    seconds : dict str -> float
        Wall-clock of the graph runs ("forward") and of the statistics updates ("statistics").
    """

    runs: dict[str, int] = field(default_factory=lambda: {"pruned": 0, "dense": 0})
    node_samples: dict[str, int] = field(default_factory=lambda: {"pruned": 0, "dense": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "statistics": 0.0})

    def passes(self, compute_nodes: int, samples: int) -> dict[str, float]:
        """Dense-forward equivalents per stream: node executions / (graph nodes x calibration samples)."""
        return {k: v / max(1, compute_nodes * samples) for k, v in self.node_samples.items()}


class _Replay:
    """Runs a stretch of the graph on one model, node by node (modules and parameters read at each call)."""

    def __init__(self, graph: StagedGraph, device: torch.device, counts: StagedCounts):
        self.graph, self.device, self.counts = graph, device, counts

    def run(self, model: nn.Module, env: dict, start: int, stop: int, save: int | None, capture: set[int],
            stream: str, samples: int) -> tuple[dict[str, Tensor], dict | None]:
        """Execute nodes start .. stop - 1 on ``env``; inputs of the modules at ``capture``; live values at ``save``.

        The node at ``stop`` is not executed (its input is captured if asked).
        Returns (module name -> first input, live values at ``save`` on the CPU or None).
        """
        graph, nodes = self.graph, self.graph.nodes
        inputs: dict[str, Tensor] = {}
        saved = None

        def value(n: torch.fx.Node):
            if n not in env and n.op == "get_attr":
                env[n] = to_device(_attribute(model, n.target), self.device)
            return env[n]

        self.counts.runs[stream] += 1
        for i in range(start, stop + 1):
            if i == save:
                saved = {n: _clone(to_device(env[n], "cpu")) if n in graph.mutated else to_device(env[n], "cpu")
                         for n in graph.live(i)}
            node = nodes[i]
            if i in capture:
                inputs[node.target] = value(node.args[0])
            if i == stop or node.op == "output":
                break
            if node.op != "placeholder":
                args, kwargs = graph.arguments(i, stream)
                args, kwargs = torch.fx.node.map_arg(args, value), torch.fx.node.map_arg(kwargs, value)
                env[node] = _execute(model, node, args, kwargs)
                if node.op != "get_attr":
                    self.counts.node_samples[stream] += samples
            for n in graph.free_after.get(i, ()):
                env.pop(n, None)
        return inputs, saved


def _attribute(model: nn.Module, target: str):
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _execute(model: nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict):
    if node.op == "get_attr":
        return _attribute(model, node.target)
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise ValueError(f"unexpected graph node {node.op} {node.name}")


def _placeholders(graph: StagedGraph, batch: Batch, model: nn.Module, concrete_args) -> dict:
    values = Batch(batch.args, batch.kwargs, None, concrete_args).trace_arguments(model)[1]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, values, strict=False))


class StagedStatistics:
    """The sequential driver on a traced graph: statistics of each site from cached stage inputs.

    Call :meth:`statistics` for the sites in their order (sites left dense may be
    skipped), cutting each one in ``work`` (and refitting its shared consumers)
    before asking for the next; see the module docstring for the schedule.

    Parameters
    ----------
    work : nn.Module
        The model being pruned (changed by the caller between calls).
    dense : nn.Module or None
        The unpruned model, for asymmetric statistics (AsymInChange); None for SeqInChange.
    sites : list of PruningSite
        The sites to be pruned, in forward order.
    graph : StagedGraph
        The traced graph of ``work`` before any cut.
    calibration : Calibration
    layout : ChannelLayout
        The layout the caller's cuts update (where each site's columns now are).
    batch_size, chunk_bytes, device, offload, precision, distributed, progress
        As in :func:`subprune.pipeline.collect_site_statistics`.
    add_batch : callable
        Adds one batch of consumer inputs to the statistics:
        :func:`subprune.pipeline.add_batch_statistics` (passed in, so that both drivers share it).
    retrace : mapping site name -> str, optional
        Sites whose cut changes a constant of the graph (with why,
        :meth:`StagedGraph.baked_constant`): after each of them is cut, the next
        request retraces ``work`` on ``head`` and adopts the new graph's arguments.
    head : Batch, optional
        The first calibration samples for those retraces (required with ``retrace``).
    leaf_modules : tuple of str
        As in :func:`subprune.graph.trace`.

    Attributes
    ----------
    counts : StagedCounts
    """

    def __init__(self, work: nn.Module, dense: nn.Module | None, sites: list[PruningSite], graph: StagedGraph,
                 calibration: Calibration, layout: ChannelLayout, *, batch_size: int, chunk_bytes: int,
                 device: torch.device, offload: bool = False, precision: str = "float64",
                 distributed: bool = False, progress: bool = False, add_batch: Callable,
                 retrace: Mapping[str, str] | None = None, head: Batch | None = None,
                 leaf_modules: tuple[str, ...] = ()) -> None:
        self.work, self.dense, self.sites, self.graph = work, dense, list(sites), graph
        self.retrace, self.head, self.leaf_modules = dict(retrace or {}), head, tuple(leaf_modules)
        if self.retrace and head is None:
            raise ValueError("retracing after cuts needs the first calibration samples (head=)")
        self._stale = False  # a site in ``retrace`` was handed out (and so cut) since the last trace
        self.layout, self.chunk_bytes, self.device = layout, chunk_bytes, device
        self.offload, self.precision, self.distributed = offload, precision, distributed
        self.add_batch = add_batch
        self.counts = StagedCounts()
        self.samples = len(calibration)
        self._replay = _Replay(graph, device, self.counts)
        self._position = {s.name: i for i, s in enumerate(self.sites)}
        n = len(graph.nodes)
        firsts = [min(graph.touched(s), default=n) for s in self.sites]
        self.cuts = [min(firsts[k:]) for k in range(len(firsts))]  # c_k: nothing before it changes again
        self.consumer_calls = []  # per site: (capture indices, stop index)
        for s in self.sites:
            calls = [graph.calls.get(r.module) for r in s.consumers]
            if not all(calls):
                raise ValueError(f"site {s.name}: a consumer is never called in the traced graph")
            capture = {i for c in calls for i in c}
            stop = max(c[0] for c in calls)
            self.consumer_calls.append(({i for i in capture if i <= stop}, stop))
        first_consumers = [min(c) for c, _ in self.consumer_calls]
        self.dense_saves = [min(first_consumers[k + 1 :], default=n) for k in range(len(self.sites))]
        batches = list(calibration.batches(batch_size))  # kept where they are (the CPU); each run moves its batch
        self.batch_sizes = [len(b) for b in batches]
        start = [_placeholders(graph, b, work, calibration.concrete_args) for b in batches]
        self.cache = _Cache(0, start)
        self.dense_cache = _Cache(0, [dict(v) for v in start]) if dense is not None else None
        # Consumers that several sites feed (refit jointly after their last site): their dense inputs are kept.
        self.shared = set(shared_consumers(self.sites)) if dense is not None else set()
        self._dense_inputs: dict[str, list[Tensor]] = {}

    def statistics(self, site: PruningSite) -> list[GramStatistics]:
        """Statistics of ``site`` in ``work`` as it is now (and, for Asym, its targets in ``dense``).

        Returns
        -------
        list of GramStatistics
            One per consumer of the site, as :func:`subprune.pipeline.collect_site_statistics`.
        """
        self._refresh()
        k = self._position[site.name]
        capture, stop = self.consumer_calls[k]
        cut = self.cuts[k]
        if cut < self.cache.index:
            raise RuntimeError(f"site {site.name} asked for out of order")
        stats = {site.name: [GramStatistics(r.span * r.kernel, self.dense is not None, self.device, r.module,
                                            self.precision) for r in site.consumers]}
        consumers = {r.module: get_module(self.work, r.module) for r in site.consumers}
        models = [self.work] if self.dense is None else [self.work, self.dense]
        saved, dense_saved = [], []
        dense_save = None
        if self.dense_cache is not None:
            dense_save = max(self.dense_cache.index, min(stop, self.dense_saves[k]))
        with offload_modules(models, self.device) if self.offload else contextlib.nullcontext(), torch.no_grad():
            for b, size in enumerate(self.batch_sizes):
                started = time.perf_counter()
                env = {n: to_device(v, self.device) for n, v in self.cache.values[b].items()}
                self.cache.values[b] = {}  # each cache is read once: free it as the run goes
                inputs, live = self._replay.run(self.work, env, self.cache.index, stop, cut, capture, "pruned",
                                                size)
                saved.append(live)
                targets = None
                if self.dense_cache is not None:
                    env = {n: to_device(v, self.device) for n, v in self.dense_cache.values[b].items()}
                    self.dense_cache.values[b] = {}
                    targets, live = self._replay.run(self.dense, env, self.dense_cache.index, stop, dense_save,
                                                     capture, "dense", size)
                    dense_saved.append(live)
                    for name in self.shared & set(targets):
                        kept = self._dense_inputs.setdefault(name, [None] * len(self.batch_sizes))
                        kept[b] = targets[name].to("cpu", copy=True)
                forward_done = time.perf_counter()
                self.add_batch([site], stats, consumers, inputs, targets, self.layout, self.chunk_bytes)
                self.counts.seconds["forward"] += forward_done - started
                self.counts.seconds["statistics"] += time.perf_counter() - forward_done
        self.cache = _Cache(cut, saved)
        if self.dense_cache is not None:
            self.dense_cache = _Cache(dense_save, dense_saved)
        if self.distributed:
            for stat in stats[site.name]:
                all_reduce_statistics(stat)
        self._stale = self._stale or site.name in self.retrace
        return stats[site.name]

    def _refresh(self) -> None:
        """Retrace ``work`` if a cut since the last trace changed a constant of the graph (:meth:`StagedGraph.adopt`).

        Raises
        ------
        RetraceMismatch
            If the retraced graph differs from the first one in more than constants.
        """
        if not self._stale:
            return
        started = time.perf_counter()
        with offload_modules([self.work], self.device) if self.offload else contextlib.nullcontext():
            self.graph.adopt(trace(self.work, self.head, self.leaf_modules))
        self._stale = False
        self.counts.seconds["retrace"] = self.counts.seconds.get("retrace", 0.0) + time.perf_counter() - started

    def capture(self, consumer: str) -> list[Tensor]:
        """The input of ``consumer`` in ``work`` as it is now, per batch, on the CPU: one run from the current cut.

        Raises
        ------
        RuntimeError
            If the consumer lies before the current cut (it cannot be reached from the cache).
        """
        self._refresh()
        stop = self.graph.calls[consumer][0]
        if stop < self.cache.index:
            raise RuntimeError(f"consumer {consumer} lies before the cached cut")
        out = []
        with offload_modules([self.work], self.device) if self.offload else contextlib.nullcontext(), torch.no_grad():
            for b, size in enumerate(self.batch_sizes):  # the cache is read, not consumed: copy what gets changed
                env = {n: to_device(_clone(v) if n in self.graph.mutated else v, self.device)
                       for n, v in self.cache.values[b].items()}
                inputs, _ = self._replay.run(self.work, env, self.cache.index, stop, None, {stop}, "pruned", size)
                out.append(inputs[consumer].to("cpu", copy=True))
        return out

    def dense_inputs(self, consumer: str) -> list[Tensor]:
        """The input of a consumer that several sites feed, in the dense model, per batch (from the dense runs)."""
        return self._dense_inputs[consumer]

    def replays(self, model: nn.Module, batch: Batch, concrete_args=None) -> bool:
        """True if the graph replayed on ``model`` (pruned now) gives ``model``'s own output on ``batch``.

        A cut since the last trace that changed a constant of the graph (the last site's) is retraced first.
        """
        self._refresh()
        with offload_modules([model], self.device) if self.offload else contextlib.nullcontext(), torch.no_grad():
            try:
                replayed = replay_output(self.graph, model, batch, concrete_args, self.device, "pruned")
            except Exception as exc:  # a size the graph fixed no longer fits: the caller repeats per site
                log.info("the replayed graph fails on the pruned model: %s", exc)
                return False
            return same_outputs(replayed, batch.run(model))

    def passes(self) -> dict[str, float]:
        """Dense-forward equivalents executed so far, per stream (see :meth:`StagedCounts.passes`)."""
        return self.counts.passes(self.graph.compute_nodes, self.samples)


def replay_output(graph: StagedGraph, model: nn.Module, batch: Batch, concrete_args, device: torch.device,
                  stream: str = "dense"):
    """The output of the traced graph replayed on ``model`` (its current modules) for one batch.

    ``stream`` "pruned" replays with the arguments of the latest retrace (:meth:`StagedGraph.adopt`).
    """
    env = _placeholders(graph, batch, model, concrete_args)
    counts = StagedCounts()
    replay = _Replay(graph, device, counts)
    with torch.no_grad():
        _, live = replay.run(model, env, 0, graph.output, graph.output, set(), stream, len(batch))
    out_args = graph.arguments(graph.output, stream)[0][0]
    return torch.fx.node.map_arg(out_args, lambda n: live[n] if n in live else _attribute(model, n.target))


def same_outputs(a, b) -> bool:
    """Two model outputs (tensors, tuples, dicts of tensors) equal to float32 round-off."""
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(flat_a, flat_b, strict=True):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor):
            if x.shape != y.shape or not torch.allclose(x.double().cpu(), y.double().cpu(), rtol=1e-5, atol=1e-6):
                return False
        elif x != y:
            return False
    return True


def staged_statistics(
    work: nn.Module, dense: nn.Module | None, sites: list[PruningSite], calibration: Calibration,
    layout: ChannelLayout, *, leaf_modules: tuple[str, ...] = (), device: torch.device, offload: bool = False,
    **kwargs,
) -> tuple[StagedStatistics | None, str]:
    """The staged driver for ``sites`` of ``work``, or None and the reason it does not apply.

    Parameters
    ----------
    work, dense, sites, calibration, layout
        As in :class:`StagedStatistics`.
    leaf_modules : tuple of str
        As in :func:`subprune.graph.trace`.
    device, offload, **kwargs
        As in :class:`StagedStatistics`.

    Returns
    -------
    (StagedStatistics or None, str)
        The driver, or None with why the per-site driver is used instead: a
        replayed graph that does not reproduce the model's output on the first
        calibration samples. Sites whose cut changes a constant of the traced
        graph are retraced after (:class:`StagedStatistics` ``retrace``); the
        engine string then says how many ("staged, retraced after N sites").
    """
    head = calibration.head(2, device)
    with offload_modules([work], device) if offload else contextlib.nullcontext():
        graph = StagedGraph(trace(work, head, leaf_modules), work)
        retrace = {s.name: reason for s in sites if (reason := graph.baked_constant(s)) is not None}
        with torch.no_grad():
            expected = head.run(work)
        if not same_outputs(replay_output(graph, work, head, calibration.concrete_args, device), expected):
            return None, "the traced graph replayed node by node does not reproduce the model's output"
    for name, reason in retrace.items():
        log.debug("staged engine: retrace after site %s (%s)", name, reason)
    engine = f"staged, retraced after {len(retrace)} site{'s' if len(retrace) != 1 else ''}" if retrace else "staged"
    return StagedStatistics(work, dense, sites, graph, calibration, layout, device=device, offload=offload,
                            retrace=retrace, head=head, leaf_modules=leaf_modules, **kwargs), engine


@contextlib.contextmanager
def counting_calls(min_batch: int = 1) -> Iterator[dict[str, int]]:
    """Count the samples that pass through every leaf module called while the context is open.

    A global forward pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``)
    sees every module call, so the pipeline's working and dense copies and the
    surgery's new modules are all counted. Yields a dict module class name ->
    samples seen (a leaf module called on a batch of B samples adds B); divide
    by the same count for one dense forward pass (:func:`dense_forward_equivalents`).
    Calls on fewer than ``min_batch`` samples (the pipeline's 2-sample trace and
    check runs) are not counted. The hook is removed on exit.
    """
    counts: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        if next(module.children(), None) is not None:
            return
        x = args[0] if args else None
        samples = int(x.shape[0]) if isinstance(x, Tensor) and x.ndim else 1
        if samples >= min_batch:
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + samples

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def dense_forward_equivalents(counts: Mapping[str, int], dense: Mapping[str, int]) -> float:
    """Module executions in ``counts`` over those of one dense forward pass (``dense``): 1.0 is one pass.

    Both come from :func:`counting_calls`; ``dense`` counted over one forward pass
    of the dense model on the same calibration samples.
    """
    return sum(counts.values()) / max(1, sum(dense.values()))
