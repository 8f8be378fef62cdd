"""The pruning pipeline shared by every method: statistics -> selection -> refit -> surgery.

``prune(model, calibration, config)`` returns a physically smaller copy of the
model; the input model is never modified. The method decides where statistics
come from and how channels are chosen (:mod:`subprune.methods`); everything
else is shared. Source: El Halabi et al., NeurIPS 2022, Sec. 4.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from subprune import validation
from subprune.baselines import LossFn, ScoreContext, default_loss
from subprune.budgets import ParameterCounter, curve_plan, global_plan, keep_ratio_for_compression, kept_channels
from subprune.calibration import Batch, Calibration, as_calibration, check_module
from subprune.core.plan import MIN_CALIBRATION_SAMPLES, check_sample_count, objective_curves, plan_units
from subprune.core.site import SiteOptions, SiteReport, prune_site
from subprune.devices import MemoryTracker, PeakMemory, eval_mode, offload_modules, resolve_device
from subprune.distributed import all_reduce_statistics, require_initialized
from subprune.graph_adapter import GraphSiteAdapter
from subprune.joint_refit import JointRefit, dense_joint_sites
from subprune.methods import METHODS, Method, get_method
from subprune.sites import (
    ChannelRange,
    NothingToPruneError,
    PrunedModelError,
    PruningSite,
    SkippedLayer,
    find_sites,
    select_sites,
)
from subprune.staged import RetraceMismatch, staged_statistics
from subprune.statistics import (
    DEFAULT_CHUNK_BYTES,
    PRECISIONS,
    GramStatistics,
    capture_paired,
    consumer_input_rows,
    run_to_capture,
)
from subprune.surgery import ChannelLayout, get_module

log = logging.getLogger(__name__)

BUDGETS = ("uniform", "curve")
ENGINES = ("staged", "per-site")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run, validated once.

    Attributes
    ----------
    method : str
        A key of :data:`subprune.methods.METHODS`: "layer", "seq", "asym" or a
        baseline ("random", "weightnorm", "layer-actgrad", ...).
    keep : float or mapping site name -> float, optional
        Keep ratio in (0, 1]: the fraction of each site's channels kept
        (at least one). A mapping gives per-site ratios; sites it does not name
        are not pruned. Default 0.5 when ``compression`` is not given; giving
        both raises ValueError (the keep ratios then come from the target and
        ``keep`` stays None).
    compression : float, optional
        Target compression ratio of whole-network parameters (dense / pruned,
        >= 1) instead of a keep ratio: the uniform keep ratio, the global
        ranking or the curve budget is chosen to meet it.
    budget : str
        "uniform": every site keeps the same ratio; "curve": channels go where
        the sites' objective curves f(S_k) (greedy on the dense model's
        statistics) gain most (:func:`subprune.budgets.curve_plan`). Methods
        with a global ranking set their own budget and take only "uniform".
    reweight : bool
        Refit the consumer weights by least squares on the kept channels.
    layers : tuple of str, optional
        Only prune the sites whose producers are named here.
    epsilon : float
        Stochastic greedy parameter in [0, 1); 0 is plain greedy.
    ridge : float
        Relative ridge >= 0 for the solver and the refit (times mean(diag G)).
    interpolation_ridge : float
        Relative ridge >= 0 used instead of ``ridge`` (where larger) at a site
        whose refit has fewer calibration rows than twice its kept columns, so
        that plain least squares (nearly) interpolates the calibration set
        (a Linear consumer after a flatten: one row per sample, kh*kw*C columns).
        0 (default): ``ridge`` everywhere. 0.1 lifts ccexam-mnistnet at x16 from
        77.5% to 96% (docs/zoo.md, "Why Torch-Pruning won on ccexam-mnistnet").
    batch_size : int
        Calibration samples per forward pass.
    seed : int
        Seed of the stochastic greedy's generator.
    chunk_bytes : int
        Memory bound of one chunk of unfolded patches.
    progress : bool
        Show progress bars.
    device : str or torch.device, optional
        Compute device of the statistics, the solver and the forward passes
        ("cpu", "cuda", "cuda:1"); default: the model's device. The pruned model
        is returned on this device, or on the CPU with ``offload``.
    offload : bool
        Layer by layer, for models larger than the device's memory: the working
        copies stay in host memory and each module's weights are moved to
        ``device`` only while it runs (:func:`subprune.devices.offload_modules`).
    precision : {"float64", "mixed"}
        Accumulation of the Gram statistics: all in float64, or float32 products
        over blocks of rows summed in float64 (:class:`subprune.statistics.GramStatistics`).
        The solver and the refit always work in float64.
    distributed : bool
        Each process of the initialised ``torch.distributed`` default group passes
        its own shard of the calibration set; the statistics are all-reduced
        before every selection, so all processes select the same channels and
        hold the same pruned model (:mod:`subprune.distributed`).
    coupled : bool
        Also prune channels tied by residual additions across several producers,
        as one coupled site each, refitting every consumer (see
        :func:`subprune.sites.find_sites`). Off: only block-internal sites.
    leaf_modules : tuple of str
        Submodules kept whole when tracing (their forward holds control flow that
        no trace follows); nothing inside them is pruned (:func:`subprune.graph.trace`).
    allow_unpruned : bool
        Return an unpruned copy, with a warning, when the model has no pruning
        site at all; off: that raises :class:`subprune.sites.NothingToPruneError`.
    engine : {"staged", "per-site"}
        How Seq/Asym collect each site's statistics: "staged" runs the traced graph
        stage by stage from cached tensors (about 2 dense-forward equivalents for
        Seq, 3 for Asym, :mod:`subprune.staged`), falling back to "per-site" (one
        run from the input to each site) where it does not apply, with the reason
        in the log and in :attr:`PruneResult.engine`. Both give the same statistics.
    """

    method: str = "asym"
    keep: float | Mapping[str, float] | None = None
    compression: float | None = None
    budget: str = "uniform"
    reweight: bool = True
    layers: tuple[str, ...] | None = None
    epsilon: float = 0.0
    ridge: float = 0.0
    interpolation_ridge: float = 0.0
    batch_size: int = 128
    seed: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: bool = True
    device: str | torch.device | None = None
    offload: bool = False
    precision: str = "float64"
    distributed: bool = False
    coupled: bool = False
    leaf_modules: tuple[str, ...] = ()
    allow_unpruned: bool = False
    engine: str = "staged"

    def __post_init__(self) -> None:
        """Check every field once; numpy/torch scalars become plain numbers (TypeError names other types)."""
        def put(name, value):
            object.__setattr__(self, name, value)

        put("method", validation.choice("method", self.method, list(METHODS)))
        if isinstance(self.leaf_modules, str):
            put("leaf_modules", (self.leaf_modules,))
        if not all(isinstance(n, str) for n in self.leaf_modules):
            raise TypeError(f"leaf_modules must be module names (a str or a tuple of str), got {self.leaf_modules!r}")
        put("leaf_modules", tuple(self.leaf_modules))
        put("allow_unpruned", validation.flag("allow_unpruned", self.allow_unpruned))
        if self.keep is not None and self.compression is not None:
            raise ValueError("give either keep ratios or a compression ratio, not both: the compression target "
                             "chooses the keep ratios (PruneConfig(compression=4) or PruneConfig(keep=0.25))")
        if self.keep is None and self.compression is None:
            put("keep", 0.5)
        if isinstance(self.keep, Mapping):
            if not self.keep:
                raise ValueError("keep={} names no site: give {site name: keep ratio}, one keep ratio, or "
                                 "compression=")
            bad = [k for k in self.keep if not isinstance(k, str)]
            if bad:
                raise TypeError(f"keep names sites by their names (str), got {type(bad[0]).__name__} {bad[0]!r}")
            put("keep", {k: _keep_ratio(f"keep ratio {k}", v) for k, v in self.keep.items()})
        elif self.keep is not None:
            put("keep", _keep_ratio("keep ratio", self.keep))
        if self.compression is not None:
            put("compression", validation.real("compression", self.compression, 1))
        put("budget", validation.choice("budget", self.budget, BUDGETS))
        if self.budget != "uniform" and METHODS[self.method].global_ranking:
            raise ValueError(f"method {self.method!r} ranks channels globally and sets its own budget; "
                             "use budget='uniform' or its Layer variant")
        put("epsilon", validation.real("epsilon", self.epsilon, 0, 1, high_open=True))
        put("ridge", validation.real("ridge", self.ridge, 0))
        put("interpolation_ridge", validation.real("interpolation_ridge", self.interpolation_ridge, 0))
        put("batch_size", validation.integer("batch_size", self.batch_size, 1))
        put("seed", validation.integer("seed", self.seed, 0))
        put("chunk_bytes", validation.integer("chunk_bytes", self.chunk_bytes, 1))
        for name in ("reweight", "progress", "offload", "distributed", "coupled"):
            put(name, validation.flag(name, getattr(self, name)))
        validation.device("device", self.device)  # kept as given (a name stays a name in reports)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else self.layers
            layers = tuple(layers) if isinstance(layers, Iterable) else layers
            if not isinstance(layers, tuple) or not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers must be producer names (a str or a tuple of str), got "
                                f"{type(self.layers).__name__} {self.layers!r}")
            if not layers:
                raise ValueError("layers=() names no layer: give producer names, or None to prune every site")
            put("layers", tuple(layers))
        put("precision", validation.choice("precision", self.precision, PRECISIONS))
        put("engine", validation.choice("engine", self.engine, ENGINES))


def _keep_ratio(name: str, value) -> float:
    """A keep ratio in (0, 1] as a float (the messages keep the words "out of range" for every bad number)."""
    try:
        return validation.real(name, value, 0, 1, low_open=True)
    except ValueError:
        raise ValueError(f"{name} {value!r} is out of range: it must be in (0, 1]") from None


@dataclass
class PruneResult:
    """The pruned model and the per-site report.

    ``joint_refits`` maps every consumer that several sites feed (and that was
    refit once more on all its kept columns, :mod:`subprune.joint_refit`) to f
    of that refit; the ``objective`` of those sites is their own refit's.
    ``unselected`` names the pruning sites that were found but left dense
    because ``config.layers`` or a per-site ``keep`` mapping did not name them
    (``skipped`` holds the layers that cannot be pruned at all).
    ``engine`` says how the statistics were collected ("dense, one pass" for
    the non-sequential methods, "staged" (or "staged, retraced after N sites" where
    cuts changed constants of the traced graph), or "per-site" with the reason the staged
    engine did not apply); ``passes`` the staged engine's dense-forward
    equivalents per stream ("pruned", "dense"), empty for the other drivers.
    """

    model: nn.Module
    sites: list[SiteReport]
    skipped: list[SkippedLayer]
    config: PruneConfig
    seconds: float
    memory: PeakMemory | None = None
    joint_refits: dict[str, float] = field(default_factory=dict)
    unselected: list[str] = field(default_factory=list)
    engine: str = ""
    passes: dict[str, float] = field(default_factory=dict)
    engine_seconds: dict[str, float] = field(default_factory=dict)


def _check_calibration(calibration: Calibration) -> None:
    tensors = calibration.head(1).tensors()
    for tensor in tensors:
        validation.tensor("calibration", tensor)  # (not on the meta device)
    check_sample_count(len(calibration) if tensors and tensors[0].ndim >= 1 else 0, calibration.describe())
    calibration.check_finite()


_kept_count = kept_channels
_plan = plan_units  # (the name the drivers and tests used)


def _site_rows(module: nn.Module, x: Tensor, ref: ChannelRange, start: int, chunk_bytes: int):
    """Rows of B restricted to the site's columns in ``module`` (its input ``x``, site at ``start``)."""
    if isinstance(module, nn.Conv2d):
        x = x[:, start : start + ref.span]  # (N, span, H, W): unfold only the site's channels
    else:
        x = x[..., start * ref.kernel : (start + ref.span) * ref.kernel]  # (N, span * kernel)
    return consumer_input_rows(module, x, chunk_bytes)


def add_batch_statistics(
    sites: list[PruningSite],
    stats: dict[str, list[GramStatistics]],
    consumers: Mapping[str, nn.Module],
    inputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor] | None,
    layout: ChannelLayout | None,
    chunk_bytes: int,
) -> None:
    """Add one batch of consumer inputs to the statistics of ``sites`` (both sequential drivers call this).

    Parameters
    ----------
    sites : list of PruningSite
    stats : dict site name -> list of GramStatistics
        Updated in place, in the order of ``site.consumers``.
    consumers : mapping consumer name -> module
        The consumers in the model being pruned.
    inputs : mapping consumer name -> Tensor
        Each consumer's input on the batch (B): (N, C, H, W) for a Conv2d, (..., d) for a Linear.
    targets : mapping consumer name -> Tensor, optional
        The same consumers' inputs in the dense model on the same batch (A); None for symmetric statistics.
    layout : ChannelLayout, optional
        Where earlier cuts moved the sites' columns (``targets`` are addressed in dense indices).
    chunk_bytes : int
        Memory bound of one chunk of unfolded patches.

    Raises
    ------
    ValueError
        A Linear consumer reads a tensor whose other dimensions hold pruned channels (no row pairing for Asym).
    """
    for site in sites:
        for ref, stat in zip(site.consumers, stats[site.name], strict=True):
            module = consumers[ref.module]
            here = ref.start if layout is None else layout.start(ref.module, "in", ref.start)
            rows_b = _site_rows(module, inputs[ref.module], ref, here, chunk_bytes)
            if targets is None:
                for b in rows_b:
                    stat.update(b)
            else:
                if targets[ref.module].shape[:-1] != inputs[ref.module].shape[:-1] and not isinstance(
                        module, nn.Conv2d):
                    raise ValueError(
                        f"consumer '{ref.module}' reads a tensor whose other dimensions hold pruned channels "
                        f"({tuple(targets[ref.module].shape)} in the dense model, "
                        f"{tuple(inputs[ref.module].shape)} now; a Linear acting across a pruned dimension, "
                        "as Mixer's token MLP): the asymmetric target cannot pair its rows; use method "
                        "'seq' or 'layer', or coupled=False")
                rows_a = _site_rows(module, targets[ref.module], ref, ref.start, chunk_bytes)
                for b, a in zip(rows_b, rows_a, strict=True):
                    stat.update(b, a)


def collect_site_statistics(
    model: nn.Module,
    sites: list[PruningSite],
    calibration,
    *,
    dense: nn.Module | None = None,
    layout: ChannelLayout | None = None,
    batch_size: int = 128,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    description: str = "calibration",
    device: torch.device | None = None,
    offload: bool = False,
    precision: str = "float64",
    distributed: bool = False,
) -> dict[str, list[GramStatistics]]:
    """Stream the consumer inputs of ``sites`` into Gram statistics, one per consumer of each site.

    Parameters
    ----------
    model : nn.Module
        The model being pruned (gives B).
    sites : list of PruningSite
    calibration : Calibration, or any form :func:`subprune.calibration.as_calibration` takes
        Unlabeled inputs (a Tensor of shape (N, ...), batches, ...).
    dense : nn.Module, optional
        The original model (gives A): when given, the statistics are asymmetric,
        from paired forward passes on the same batch.
    layout : ChannelLayout, optional
        Where earlier cuts moved the sites' columns in ``model`` (``dense`` is
        always addressed in dense indices).
    batch_size, chunk_bytes, progress, description
        Forward batch size, memory bound on unfolded patches, progress bar.
    device : torch.device, optional
        Compute device of the forward passes and the statistics; default: the model's.
    offload : bool
        Keep the weights on the CPU and move each module to ``device`` while it runs.
    precision : {"float64", "mixed"}
        See :class:`GramStatistics`.
    distributed : bool
        All-reduce the statistics over the default process group at the end
        (each process passed its own shard of the calibration set).

    Returns
    -------
    dict site name -> list of GramStatistics
        In the order of ``site.consumers``; statistic j covers only the site's
        columns of consumer j: d_j = span_j * kernel_j.

    Raises
    ------
    NonFiniteActivationError
        If a consumer input holds NaN or infinite values.

    Notes
    -----
    With a single site the forward passes stop right after its last consumer's
    input is read. Hooks are removed when done; the models are not changed.
    """
    device = resolve_device(device, model)
    calibration = as_calibration(calibration, model)
    names = {ref.module for s in sites for ref in s.consumers}
    consumers = {name: get_module(model, name) for name in names}
    stop = sites[0].consumers[-1].module if len(sites) == 1 else None
    stats = {
        s.name: [
            GramStatistics(ref.span * ref.kernel, dense is not None, device, ref.module, precision)
            for ref in s.consumers
        ]
        for s in sites
    }
    dense_consumers = {} if dense is None else {name: get_module(dense, name) for name in names}
    batches = calibration.batches(batch_size, device)
    models = [model] if dense is None else [model, dense]
    with offload_modules(models, device) if offload else contextlib.nullcontext():
        for batch in tqdm(batches, desc=description, disable=not progress, leave=False,
                          total=calibration.n_batches(batch_size)):
            inputs, targets = capture_paired(
                model, dense, consumers, dense_consumers, lambda m, b=batch: run_to_capture(m, b), stop
            )
            add_batch_statistics(sites, stats, consumers, inputs, targets if dense is not None else None, layout,
                                 chunk_bytes)
    if distributed:
        for site_stats in stats.values():
            for stat in site_stats:
                all_reduce_statistics(stat)
    return stats


def collect_statistics(
    model: nn.Module, sites: list[PruningSite], calibration, **kwargs
) -> dict[str, GramStatistics]:
    """As :func:`collect_site_statistics` for sites with one consumer: one GramStatistics per site.

    Raises
    ------
    ValueError
        If a site has several consumers (use :func:`collect_site_statistics`).
    """
    several = [s.name for s in sites if len(s.consumers) != 1]
    if several:
        raise ValueError(f"sites {several} have several consumers; use collect_site_statistics")
    stats = collect_site_statistics(model, sites, calibration, **kwargs)
    return {name: values[0] for name, values in stats.items()}


def _check_labels(method: Method, calibration: Calibration) -> None:
    if not method.needs_labels:
        return
    if calibration.labels is None:
        names = ", ".join(k for k, m in METHODS.items() if not m.needs_labels)
        raise ValueError(f"method {method.name} needs labelled calibration data (it evaluates the loss or its "
                         f"gradient): "
                         f"pass labels=<Tensor of shape (N,)> to prune() or (inputs, labels) batches, or use a "
                         f"method that needs no labels: {names}")


def _objective_curves(sites: list[PruningSite], dense: nn.Module, stats: dict[str, list[GramStatistics]],
                      ridge: float) -> dict[str, Tensor]:
    """Greedy's whole nested curve f(S_1..S_n) of every site, from the dense model's statistics."""
    adapter = GraphSiteAdapter()
    return objective_curves({s.name: adapter.system(dense, s, stats[s.name]).problem for s in sites}, ridge)


def _budget(method: Method, config: PruneConfig, dense: nn.Module | None, sites: list[PruningSite],
            plan: dict[str, int], stats: dict[str, list[GramStatistics]],
            scores: dict[str, Tensor]) -> dict[str, int]:
    """Channels kept per site: from the keep ratio, a compression target, a global ranking or the curves."""
    target: dict = {"total": sum(plan.values())}
    if config.compression is not None:
        target = {"counter": ParameterCounter(dense, sites), "compression": config.compression}
    if method.global_ranking:
        return global_plan(sites, scores, **target)
    if config.budget == "curve":
        return curve_plan(sites, _objective_curves(sites, dense, stats, config.ridge), **target)
    if config.compression is not None:
        ratio = keep_ratio_for_compression(target["counter"], sites, config.compression)
        return {s.name: kept_channels(ratio, s.channels) for s in sites}
    return plan


def site_options(config: PruneConfig) -> SiteOptions:
    """The settings of ``config`` that the per-site step reads."""
    return SiteOptions(reweight=config.reweight, epsilon=config.epsilon, ridge=config.ridge,
                       distributed=config.distributed, interpolation_ridge=config.interpolation_ridge)


def _prune_one_site(
    work: nn.Module,
    site: PruningSite,
    stats: list[GramStatistics],
    k: int,
    config: PruneConfig,
    generator: torch.Generator,
    layout: ChannelLayout,
    scores: Tensor | None = None,
) -> SiteReport:
    """Select, refit and cut one site of ``work`` in place (:func:`subprune.core.site.prune_site`, fx adapter)."""
    adapter = GraphSiteAdapter(layout, scores, config.reweight, config.ridge)
    return prune_site(work, site, stats, k, adapter, get_method(config.method).select, site_options(config),
                      generator)


def _check_runs(model: nn.Module, batch: Batch, device: torch.device, offload: bool) -> None:
    """One forward pass of the pruned model: a width fixed in forward() (a constant shape) fails here, named."""
    try:
        with offload_modules([model], device) if offload else contextlib.nullcontext(), torch.no_grad():
            batch.run(model)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunedModelError(
            f"the pruned {type(model).__name__} does not run ({type(exc).__name__}: {detail}): its forward() fixes a "
            "width that pruning changed (a constant shape or size); prune fewer layers (layers=...) or keep the "
            "module that holds it whole (leaf_modules=...)"
        ) from exc


def prune(
    model: nn.Module,
    calibration,
    config: PruneConfig | None = None,
    *,
    labels: Tensor | None = None,
    loss_fn: LossFn | None = None,
    score_data: tuple[Tensor, Tensor] | None = None,
    concrete_args: Mapping | None = None,
) -> PruneResult:
    """Prune ``model`` with a few hundred unlabeled samples; return a smaller copy.

    Parameters
    ----------
    model : nn.Module
        A trained model, traceable by torch.fx. Not modified: pruning works on a
        deep copy (the working copy, returned pruned), on ``config.device``
        (default: the model's own device) or, with ``config.offload``, in host
        memory. Where the method needs the dense model (AsymInChange's targets,
        LayerInChange, the baselines, compression and curve budgets) it reads
        ``model`` itself, in eval mode for the run (its training flags are
        restored after) and under ``torch.no_grad``; only when ``model`` is on
        another device than the statistics is a second, moved copy made. Peak
        memory: ``model`` + the working copy + the staged caches.
    calibration : Tensor of shape (N, ...), ndarray, Dataset, DataLoader, list of batches, dict, or Calibration
        Inputs preprocessed as the model expects, N >= 2 samples in all (the
        paper uses 512). Batches may be Tensors (``model(x)``), tuples
        (``model(*batch)``; an ``(inputs, labels)`` pair gives the labels) or
        dicts (``model(**batch)``); see :func:`subprune.calibration.as_calibration`.
    config : PruneConfig, optional
        Method, keep ratios, reweighting, layers; defaults to AsymInChange at 0.5.
    labels : Tensor of shape (N,), optional
        Labels of the calibration samples, used only by methods that need them
        (``Method.needs_labels``: ActGrad, LayerActGrad); overrides labels the batches carry.
    loss_fn : callable(outputs, labels) -> scalar Tensor, optional
        The loss for those methods; default cross-entropy summed over the batch.
    score_data : (Tensor of shape (M, ...), Tensor of shape (M,)), optional
        A larger labelled set (inputs preprocessed as ``calibration``, labels) for
        methods whose score evaluates the loss on it (``Method.needs_score_data``:
        LayerGreedyFS-full takes the whole training split).
    concrete_args : dict parameter name -> value, optional
        ``forward`` arguments fixed while the graph is traced (torch.fx
        ``concrete_args``). By default every argument the batches do not give
        as a Tensor is fixed to its given or default value, so
        ``forward(x, mask=None)`` is traced without a mask.

    Returns
    -------
    PruneResult
        ``.model`` is the physically pruned copy; ``.sites`` the per-site report;
        ``.memory`` the peak memory of the run on the compute device.

    Raises
    ------
    TypeError
        ``model`` is TorchScript or a ``torch.compile`` wrapper (pass the
        original module), or the calibration data is of no supported form.
    ValueError
        Too few or non-finite calibration samples; bad keep ratios; a method
        that needs labels (or ``score_data``) got none; an unreachable compression ratio.
    subprune.sites.TraceError
        The model cannot be traced, or the calibration inputs have the wrong shape.
    subprune.sites.UnprunableLayerError
        A layer named in ``config.layers`` cannot be pruned (the reason is given).
    subprune.sites.NothingToPruneError
        The model has no pruning site (unless ``config.allow_unpruned``); the reasons are given.
    subprune.sites.PrunedModelError
        The pruned model does not run (a width fixed in its forward()).
    subprune.statistics.NonFiniteActivationError
        NaN or infinite activations reach a consumer.
    """
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig (e.g. PruneConfig(keep=0.5)), got {type(config).__name__}")
    config = config or PruneConfig()
    check_module(model)
    validation.module("model", model)  # (not on the meta device)
    calibration = as_calibration(calibration, model, labels=labels, concrete_args=concrete_args,
                                 batch_size=config.batch_size)
    _check_calibration(calibration)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, labels) -> scalar Tensor, got {type(loss_fn).__name__}")
    if score_data is not None and (not isinstance(score_data, (tuple, list)) or len(score_data) != 2
                                   or not all(isinstance(t, Tensor) for t in score_data)):
        raise TypeError("score_data must be a pair (inputs Tensor, labels Tensor), got "
                        f"{type(score_data).__name__}")
    _check_labels(get_method(config.method), calibration)
    if get_method(config.method).needs_score_data and score_data is None:
        raise ValueError(f"method {config.method!r} evaluates the loss on a larger labelled set: pass "
                         "score_data=(inputs, labels) to prune() (e.g. the whole training split)")
    if config.distributed:
        require_initialized()
    device = resolve_device(config.device, model)
    with MemoryTracker(device) as tracker:
        result = _prune(model, calibration, config, device, loss_fn, score_data)
    result.memory = tracker.result
    return result


def _prune(
    model: nn.Module,
    calibration: Calibration,
    config: PruneConfig,
    device: torch.device,
    loss_fn: LossFn | None,
    score_data: tuple[Tensor, Tensor] | None = None,
) -> PruneResult:
    """:func:`prune` on the compute ``device``, with checked arguments."""
    start_time = time.perf_counter()
    method = get_method(config.method)
    storage = torch.device("cpu") if config.offload else device
    work = copy.deepcopy(model).to(storage).eval()
    needs_dense = method.asymmetric or not method.sequential or config.budget != "uniform" or config.compression
    if not needs_dense:
        return _prune_work(model, work, None, calibration, config, device, loss_fn, score_data, start_time)
    if not _on(model, storage):  # the dense reference must sit where the statistics are computed: a moved copy
        dense = copy.deepcopy(model).to(storage).eval()
        return _prune_work(model, work, dense, calibration, config, device, loss_fn, score_data, start_time)
    with _read_only(model) as dense:
        return _prune_work(model, work, dense, calibration, config, device, loss_fn, score_data, start_time)


def _on(model: nn.Module, device: torch.device) -> bool:
    """Every parameter and buffer of ``model`` is on ``device`` (an index-less "cuda" matches any CUDA device)."""
    def same(d: torch.device) -> bool:
        return d.type == device.type and (device.index is None or d.index in (None, device.index))

    return all(same(t.device) for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def _read_only(model: nn.Module):
    """The user's ``model`` itself as the dense reference, in eval mode while the run lasts.

    The dense reference (the targets A of AsymInChange, the statistics of
    LayerInChange and the baselines, the objective curves, the parameter counts)
    is only read: every forward pass on it runs under ``torch.no_grad`` (the
    ActGrad baselines take gradients of activations with ``torch.autograd.grad``,
    which leaves ``.grad`` alone), hooks are removed after each pass, and
    nothing is cut or refit in it. So no deep copy is needed; only the training
    flags change (dropout off, BatchNorm running statistics frozen) and they are
    restored on exit, also after an error. Peak memory: the user's model, the
    working copy (which becomes the pruned model) and the caches.
    """
    with eval_mode(model):
        yield model


def _prune_work(model: nn.Module, work: nn.Module, dense: nn.Module | None, calibration: Calibration,
                config: PruneConfig, device: torch.device, loss_fn: LossFn | None,
                score_data: tuple[Tensor, Tensor] | None, start_time: float) -> PruneResult:
    """:func:`_prune` on the working copy ``work`` with the dense reference ``dense`` (None: none needed)."""
    method = get_method(config.method)
    with offload_modules([work], device) if config.offload else contextlib.nullcontext():
        all_sites, skipped = find_sites(work, calibration.head(MIN_CALIBRATION_SAMPLES, device),
                                        coupled=config.coupled, leaf_modules=config.leaf_modules)
    if not all_sites and not config.allow_unpruned:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "it has no Linear/Conv layers"
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        hint = "" if config.coupled else "; try coupled=True (CLI --coupled) for residual streams"
        raise NothingToPruneError(f"nothing in {type(model).__name__} can be pruned: {reasons}{more}{hint}; "
                                  "pass allow_unpruned=True to get an unpruned copy instead")
    sites = select_sites(all_sites, skipped, list(config.layers) if config.layers else None)
    plan = _plan(sites, 1.0 if config.keep is None else config.keep,  # None: the compression target decides
                 found={s.name for s in all_sites})
    sites = [s for s in sites if s.name in plan]
    unselected = [s.name for s in all_sites if s.name not in plan]
    if not sites:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped) or "no Linear/Conv2d layers"
        log.warning("nothing to prune: no pruning site was found or selected (%s)", reasons)
    generator = torch.Generator().manual_seed(config.seed)

    common = dict(batch_size=config.batch_size, chunk_bytes=config.chunk_bytes, progress=config.progress,
                  device=device, offload=config.offload, precision=config.precision, distributed=config.distributed)
    layer_stats, joint_stats = {}, {}
    if not method.sequential or config.budget == "curve":
        joint_sites = dense_joint_sites(sites, dense) if config.reweight and not method.sequential else []
        layer_stats = collect_site_statistics(dense, sites + joint_sites, calibration, description="calibration",
                                              **common)
        joint_stats = {s.name: layer_stats.pop(s.name) for s in joint_sites}  # shared consumers' whole input
    scores = {}
    if not method.global_ranking:  # the budget comes first; the scores may use it (GreedyFS stops at k)
        plan = _budget(method, config, dense, sites, plan, layer_stats, scores)
    if method.score is not None:
        context = ScoreContext(dense, sites, calibration, calibration.labels, loss_fn or default_loss,
                               config.batch_size, generator, None if method.global_ranking else plan, score_data)
        scores = method.score(context)
    if method.global_ranking:
        plan = _budget(method, config, dense, sites, plan, layer_stats, scores)
    layout = ChannelLayout()

    reports = []
    driver, engine = None, "dense, one pass"
    if method.sequential and sites:
        engine = "per-site (engine='per-site')"
        if config.engine == "staged":
            driver, engine = staged_statistics(work, dense if method.asymmetric else None, sites, calibration, layout,
                                               leaf_modules=config.leaf_modules, add_batch=add_batch_statistics,
                                               **common)
            if driver is None:
                log.info("statistics site by site: the staged engine does not apply (%s)", engine)
                engine = f"per-site ({engine})"
    # Consumers read by several sites (after a concatenation) are refit once more, jointly, after their last site.
    joint = JointRefit(sites, dense, method.sequential, method.asymmetric, calibration, config.ridge, inputs=driver,
                       dense_statistics=joint_stats, **common) if config.reweight else None
    try:  # a retrace of the staged engine may find a cut that changed the graph's structure
        upstream_pruned = False  # Asym refits a fully kept site only to absorb earlier sites' changes
        for site in tqdm(sites, desc=f"{method.name}", disable=not config.progress):
            site_start = time.perf_counter()
            k = plan[site.name]
            if joint is not None:
                joint.before(site, work, layout)
            if k == site.channels and not (method.asymmetric and upstream_pruned):
                reports.append(SiteReport(site.name, site.producer, site.consumer, site.channels, k,
                                          site.group_size, 1.0, keep=list(range(k)),
                                          producers=[p.module for p in site.producers],
                                          consumers=[c.module for c in site.consumers], coupled=site.coupled))
                if joint is not None:
                    joint.after(site, False, work, layout)
                continue
            if driver is not None:
                stats = driver.statistics(site)
            elif method.sequential:
                stats = collect_site_statistics(
                    work, [site], calibration, dense=dense if method.asymmetric else None, layout=layout,
                    description=site.name, **common,
                )[site.name]
            else:
                stats = layer_stats[site.name]
            report = _prune_one_site(work, site, stats, k, config, generator, layout, scores.get(site.name))
            if joint is not None:
                joint.after(site, True, work, layout)
            upstream_pruned = upstream_pruned or k < site.channels
            report.seconds = time.perf_counter() - site_start
            reports.append(report)
            log.info("site %s: kept %d/%d, f(S)=%.4f", site.name, k, site.channels, report.objective)
    except RetraceMismatch as exc:
        log.warning("the staged engine cannot follow the pruned model (%s): pruning again with per-site statistics",
                    exc)
        return _prune(model, calibration, dataclasses.replace(config, engine="per-site"), device, loss_fn,
                      score_data)
    head = calibration.head(MIN_CALIBRATION_SAMPLES, device)
    _check_runs(work, head, device, config.offload)
    if driver is not None and not driver.replays(work, head, calibration.concrete_args):
        log.warning("the traced graph no longer reproduces the pruned model (a cut changed a value the trace "
                    "fixed): pruning again with per-site statistics")
        return _prune(model, calibration, dataclasses.replace(config, engine="per-site"), device, loss_fn,
                      score_data)
    return PruneResult(work, reports, skipped, config, time.perf_counter() - start_time,
                       joint_refits={} if joint is None else joint.results_, unselected=unselected, engine=engine,
                       passes={} if driver is None else driver.passes(),
                       engine_seconds={} if driver is None else dict(driver.counts.seconds))
