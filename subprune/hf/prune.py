"""Prune the FFN neurons and attention heads of a Hugging Face transformer.

The same pipeline as :mod:`subprune.pipeline` (statistics -> selection -> refit
-> surgery), with the sites found by the architecture adapter
(:mod:`subprune.hf.architectures`) instead of torch.fx, token inputs with an
attention mask (only the rows of real tokens, mask 1, enter the statistics),
and the block engine (:mod:`subprune.hf.engine`) as the sequential driver: one
pass over the calibration set, one block at a time. ``_prune_site`` is the
per-site step: the one of every architecture (:func:`subprune.core.site.prune_site`)
with the transformer adapter (:mod:`subprune.hf.adapter`).
Methods: the paper's ``layer``/``seq``/``asym`` and the baselines ``magnitude``,
``wanda``, ``flap`` (:mod:`subprune.baselines`), each with or without refit.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from subprune import validation
from subprune.core.plan import check_sample_count, objective_curves, plan_units
from subprune.core.site import SiteOptions, SiteReport, prune_site
from subprune.hf.adapter import TransformerSiteAdapter, moment_problem
from subprune.hf.architectures import FFN, HEADS, UNITS, TransformerSite, find_transformer_sites
from subprune.hf.baselines import BASELINES, BIAS_COMPENSATED, DEFAULT_BUDGETS, MomentProblem, flap_standardised_scores
from subprune.hf.budget import TransformerParameterCounter, flap_plan, round_to_step, transformer_budget
from subprune.hf.engine import collect_block_statistics, prune_blocks
from subprune.local_search import swap_search
from subprune.methods import METHODS, Method, Selection, SiteProblem, greedy_selection
from subprune.pipeline import _keep_ratio
from subprune.statistics import PRECISIONS, GramStatistics

log = logging.getLogger(__name__)

def swap_selection(problem: SiteProblem, k: int, epsilon: float, ridge: float, generator: torch.Generator) -> Selection:
    """Greedy, then the swap local search on the same statistics (:func:`subprune.local_search.swap_search`)."""
    start = greedy_selection(problem, k, epsilon, ridge, generator)
    keep, _, _ = swap_search(problem.gram, problem.weight, problem.target_energy, problem.group_size, start.keep,
                             cross=problem.cross, ridge=ridge, parts=problem.parts)
    return Selection(keep, keep, None)


SWAP_METHODS = {
    f"{name}-swap": Method(f"{METHODS[name].name}+swap", swap_selection, METHODS[name].sequential,
                           METHODS[name].asymmetric, METHODS[name].description + ", then swap local search")
    for name in ("layer", "seq", "asym")
}
INCHANGE = ("layer", "seq", "asym", *SWAP_METHODS)  # greedy on F(S); the CNN baselines of METHODS need a CNN pipeline
TRANSFORMER_METHODS: dict[str, Method] = {**{k: METHODS[k] for k in ("layer", "seq", "asym")}, **SWAP_METHODS,
                                          **BASELINES}
BUDGETS = ("auto", "uniform", "curve", "flap")
TARGETS = ("sublayer", "residual")  # a consumer fits its sublayer output, or that plus the upstream residual error
DENSE_BUDGETS = ("curve", "flap")  # rules that read every site's dense statistics before any site is pruned


@dataclass(frozen=True)
class TransformerPruneConfig:
    """Settings of one transformer pruning run, validated once.

    Attributes
    ----------
    method : str
        A key of :data:`TRANSFORMER_METHODS`: layer, seq, asym, magnitude, wanda, flap.
    heads : float or None
        Keep ratio of attention units (heads, or key/value groups) in every block,
        in (0, 1]; ``None`` or 1 leaves attention alone.
    ffn : float or None
        Keep ratio of FFN neurons in every block; ``None`` or 1 leaves the FFN alone.
    keep : mapping site name -> float, optional
        Per-site keep ratios (e.g. from objective curves); when given, ``heads``
        and ``ffn`` are ignored and the sites it does not name are not pruned.
        A ratio of 1 still selects and refits the site.
    budget : str
        Units per site: ``"uniform"`` (the keep ratios, or one ratio meeting
        ``params``); ``"curve"``: from the greedy objective curves f(S_k) of
        every site on the dense model's statistics, at the same number of heads
        and of FFN neurons as the uniform plan, or at ``params``
        (:func:`subprune.hf.budget.transformer_budget`); ``"flap"``: FLAP's
        adaptive structure, one global ranking of standardised fluctuation
        scores over all sites at the uniform plan's parameter count or at
        ``params`` (:func:`subprune.hf.budget.flap_plan`); ``"auto"`` (default):
        the method's own (``flap`` for FLAP, ``uniform`` otherwise).
    params : float, optional
        Global parameter target in (0, 1]: the fraction of the prunable
        parameters (q/k/v rows and output-projection columns of the heads,
        up/gate rows and down-projection columns of the FFN neurons) kept, over
        the kinds of site whose keep ratio is set and below 1 (``heads=None``
        or 1 leaves attention out). Replaces the values of ``heads`` and ``ffn``.
    reweight : bool
        Least-squares refit of the consumer (output projection / down projection).
    intercept : bool
        Also refit the consumer bias (least squares with an intercept): the
        greedy methods select and refit on centred statistics, and the bias gets
        mu_A W - mu_B,S W'. Without reweighting this is mean-preserving bias
        compensation. Sites whose consumer has no bias are fit without. An
        extension of the paper's objective, off by default.
    ridge, epsilon, seed
        As in :class:`subprune.PruneConfig`.
    target : str
        What each consumer is fit to: ``"sublayer"`` (default, the paper's: the
        sublayer output, A W with the method's A) or ``"residual"``
        (AsymInChange only, pre-norm models): the sublayer's dense output plus
        the upstream residual-stream error E = r_dense - r_pruned at its
        residual addition, Y = A W + E, so the pruned block's contribution also
        absorbs what the pruned blocks before it lost, as far as the consumer
        can reach it (:mod:`subprune.hf.residual`).
    units : str
        Attention units: ``"kv"`` (default: a key/value group with its query
        heads) or ``"qheads"`` (query heads inside the groups, the shared keys
        and values kept; every group keeps the same number, so a layer keeps a
        multiple of its key/value groups). Grouped-query attention only; the
        same as "kv" otherwise. See :func:`subprune.hf.architectures.find_transformer_sites`.
    batch_size : int
        Sequences per forward pass.
    progress : bool
    device : str, optional
        Compute device of the block engine ("cpu", "cuda", "cuda:1"): the
        working block, its forward passes and the statistics; default the
        model's. Only one block is there at a time (the caches and the pruned
        blocks stay with the model), so a model larger than the device's memory
        is pruned with one block on the device at a time.
    precision : {"float64", "mixed"}
        Accumulation of the Gram sums: every product in float64 (default), or
        float32 products over blocks of at most 4,096 rows added to float64 sums
        (:class:`subprune.statistics.GramStatistics`). The solver and the refit
        always work in float64. float64 stays the default because it matters
        on real LLMs: SmolLM2-135M's activations hold a few massive features
        (cond(G) up to 8e11, results/llm_suspects.md), and on SmolLM2 with
        AsymInChange at 50% of the prunable parameters (32 passages) "mixed"
        kept 2,536 different units (f(S) off by up to 1.4e-3, held-out
        perplexity 1,478 instead of 1,723) for 19% less CPU time. "mixed" is
        for accelerators whose float64 throughput is a small fraction of float32.
    cache_dir : str, optional
        Spill the activation caches (block inputs, FFN consumer inputs) to
        memory-mapped files in this existing directory instead of holding them
        in memory (:class:`subprune.hf.engine.ActivationStore`); same results.
    """

    method: str = "asym"
    heads: float | None = 0.5
    ffn: float | None = 0.5
    keep: Mapping[str, float] | None = None
    budget: str = "auto"
    params: float | None = None
    reweight: bool = True
    intercept: bool = False
    ridge: float = 0.0
    epsilon: float = 0.0
    seed: int = 0
    target: str = "sublayer"
    units: str = "kv"
    batch_size: int = 16
    progress: bool = False
    device: str | None = None
    precision: str = "float64"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        """Check every field once; numpy/torch scalars become plain numbers (TypeError names other types)."""
        def put(name, value):
            object.__setattr__(self, name, value)

        put("method", validation.choice("method", self.method, list(TRANSFORMER_METHODS)))
        for name in ("heads", "ffn"):
            if getattr(self, name) is not None:
                put(name, _keep_ratio(f"keep ratio {name}", getattr(self, name)))
        if self.keep is not None:
            if not isinstance(self.keep, Mapping) or not all(isinstance(k, str) for k in self.keep):
                raise TypeError(f"keep must map site names (str) to keep ratios, got {type(self.keep).__name__}")
            put("keep", {k: _keep_ratio(f"keep ratio {k}", v) for k, v in self.keep.items()})
        put("budget", validation.choice("budget", self.budget, BUDGETS))
        if self.params is not None:  # the fraction of the prunable parameters kept
            put("params", validation.real("params", self.params, 0, 1, low_open=True))
        if self.params is not None and self.keep is not None:
            raise ValueError("give either per-site keep ratios (keep) or a parameter target (params), not both")
        put("epsilon", validation.real("epsilon", self.epsilon, 0, 1, high_open=True))
        put("ridge", validation.real("ridge", self.ridge, 0))
        put("batch_size", validation.integer("batch_size", self.batch_size, 1))
        put("seed", validation.integer("seed", self.seed, 0))
        for name in ("reweight", "intercept", "progress"):
            put(name, validation.flag(name, getattr(self, name)))
        put("units", validation.choice("units", self.units, UNITS))
        put("target", validation.choice("target", self.target, TARGETS))
        if self.target == "residual" and not TRANSFORMER_METHODS[self.method].asymmetric:
            raise ValueError(f"target='residual' fits each consumer to the dense stream's output plus the upstream "
                             f"residual error, which only AsymInChange tracks; use method 'asym' (got "
                             f"{self.method!r}) or the default target 'sublayer'")
        if self.target == "residual" and self.intercept:
            raise ValueError("target='residual' and intercept=True cannot be combined; drop one of them")
        put("precision", validation.choice("precision", self.precision, PRECISIONS))
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)):
                raise TypeError(f"cache_dir must be a directory path, got {type(self.cache_dir).__name__}")
            if not os.path.isdir(self.cache_dir):
                raise ValueError(f"cache_dir {str(self.cache_dir)!r} is not an existing directory: create it, or "
                                 "leave cache_dir=None to keep the activation caches in memory")
            put("cache_dir", os.fspath(self.cache_dir))


@dataclass
class TransformerPruneResult:
    """The pruned model, the per-site report and the run's settings.

    ``block_executions`` counts the forward calls of transformer blocks (all
    blocks and batches, partial calls included), ``batches`` the calibration
    batches, ``timings`` the seconds of the engine's parts
    (:class:`subprune.hf.engine.BlockRun`).
    """

    model: nn.Module
    sites: list[SiteReport]
    config: TransformerPruneConfig
    seconds: float
    block_executions: int = 0
    batches: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def check_calibration(calibration: Mapping[str, Tensor]) -> None:
    """ValueError/TypeError unless ``calibration`` is {"input_ids": (N, T), "attention_mask": (N, T)}, N >= 2."""
    if not isinstance(calibration, Mapping) or "input_ids" not in calibration:
        raise TypeError("calibration must be a dict with 'input_ids' (N, T) and optionally 'attention_mask' (N, T), "
                        "e.g. the output of subprune.hf.text.tokenize")
    ids = calibration["input_ids"]
    for name, value in calibration.items():
        if isinstance(value, Tensor):
            validation.tensor(f"calibration[{name!r}]", value)
    if not isinstance(ids, Tensor) or ids.ndim != 2:
        raise ValueError(f"calibration input_ids must be a (N, T) tensor with N >= 2, got {getattr(ids, 'shape', ids)}")
    check_sample_count(ids.shape[0], f"input_ids of shape {tuple(ids.shape)}")
    mask = calibration.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")


def collect_transformer_statistics(
    model: nn.Module,
    sites: list[TransformerSite],
    calibration: Mapping[str, Tensor],
    *,
    batch_size: int = 16,
    progress: bool = False,
    device: str | torch.device | None = None,
    precision: str = "float64",
    cache_dir: str | None = None,
) -> dict[str, GramStatistics]:
    """Gram statistics and column sums of the consumer inputs of ``sites`` in ``model``, over real tokens.

    One pass of the block engine (:func:`subprune.hf.engine.collect_block_statistics`):
    the calibration set is embedded once and each block runs once per batch.

    Parameters
    ----------
    model : nn.Module
        The transformer (gives B); not modified.
    sites : list of TransformerSite
    calibration : dict with "input_ids" (N, T) and "attention_mask" (N, T)
    batch_size, progress, device
        Sequences per pass; progress bar; compute device (default: the model's).
    precision, cache_dir
        As in :class:`TransformerPruneConfig`.

    Returns
    -------
    dict site name -> GramStatistics
        Rows are the tokens whose attention mask is 1.
    """
    check_calibration(calibration)
    stats, _ = collect_block_statistics(model, sites, calibration, batch_size=batch_size, device=device,
                                        progress=progress, precision=precision, cache_dir=cache_dir)
    return stats


def _plan(sites: list[TransformerSite], config: TransformerPruneConfig) -> dict[str, int]:
    """Units to keep per site (:func:`subprune.core.plan.plan_units`); sites left at their full width are not in it."""
    if config.keep is not None:
        ratios = dict(config.keep)
    else:
        by_kind = {HEADS: config.heads, FFN: config.ffn}
        ratios = {s.name: by_kind[s.kind] for s in sites if by_kind[s.kind] not in (None, 1)}
    return round_to_step(sites, plan_units(sites, ratios))


def site_adapter(config: TransformerPruneConfig) -> TransformerSiteAdapter:
    """The transformer adapter of the per-site step with the run's refit and bias settings."""
    return TransformerSiteAdapter(reweight=config.reweight, intercept=config.intercept,
                                  greedy=config.method in INCHANGE, compensate=config.method in BIAS_COMPENSATED,
                                  ridge=config.ridge, residual=config.target == "residual")


def site_options(config: TransformerPruneConfig) -> SiteOptions:
    """The settings of ``config`` the per-site step reads (a refit warns below two rows per column, as on fx)."""
    return SiteOptions(reweight=config.reweight, epsilon=config.epsilon, ridge=config.ridge, warn_rows=2.0)


def _prune_site(
    work: nn.Module,
    site: TransformerSite,
    stats: GramStatistics,
    k: int,
    config: TransformerPruneConfig,
    generator: torch.Generator,
) -> SiteReport:
    """Select, refit and cut one site of ``work`` in place (:func:`subprune.core.site.prune_site`)."""
    return prune_site(work, site, stats, k, site_adapter(config), TRANSFORMER_METHODS[config.method].select,
                      site_options(config), generator)


def budget_plan(model: nn.Module, sites: list[TransformerSite], plan: Mapping[str, int],
                config: TransformerPruneConfig, dense_stats: Mapping[str, GramStatistics]) -> dict[str, int]:
    """Units per site under the run's budget rule and parameter target.

    Parameters
    ----------
    model : the dense model (not modified)
    sites : the sites being pruned
    plan : the uniform plan of the keep ratios
    config : the run's settings (``budget``, ``params``, ``ridge``)
    dense_stats : the dense model's statistics of ``sites``; needed by the rules of :data:`DENSE_BUDGETS`

    Returns
    -------
    dict site name -> units kept
    """
    budget = resolve_budget(config)
    counter = TransformerParameterCounter(model, sites)
    if budget == "flap":
        target = (counter.count(plan) if config.params is None
                  else counter.budget(counter.compression_for_fraction(config.params)))
        scores = {s.name: flap_standardised_scores(_moment_problem(model, s, dense_stats[s.name])) for s in sites}
        return flap_plan(sites, scores, counter, target)
    curves = _objective_curves(model, sites, dense_stats, config.ridge) if budget == "curve" else None
    return transformer_budget(sites, plan, curves=curves, counter=counter, params=config.params)


def resolve_budget(config: TransformerPruneConfig) -> str:
    """The budget rule a run uses: ``config.budget``, or for ``"auto"`` the method's own (FLAP: ``"flap"``)."""
    return DEFAULT_BUDGETS.get(config.method, "uniform") if config.budget == "auto" else config.budget


def _moment_problem(model: nn.Module, site: TransformerSite, stats: GramStatistics) -> MomentProblem:
    """The site's statistics and consumer weight of ``model`` as a :class:`MomentProblem` (raw, uncentred)."""
    return moment_problem(model, site, stats)


def get_site(sites: list[TransformerSite], name: str) -> TransformerSite:
    return next(s for s in sites if s.name == name)


def _objective_curves(dense: nn.Module, sites: list[TransformerSite], stats: Mapping[str, GramStatistics],
                      ridge: float) -> dict[str, Tensor]:
    """Greedy's whole nested curve f(S_1..S_n), shape (channels,), of every site, from the dense statistics
    (:func:`subprune.core.plan.objective_curves`; raw statistics, no key/value-group quota)."""
    return objective_curves({s.name: moment_problem(dense, s, stats[s.name]) for s in sites}, ridge)


def prune_transformer(
    model: nn.Module, calibration: Mapping[str, Tensor], config: TransformerPruneConfig | None = None
) -> TransformerPruneResult:
    """Prune heads and FFN neurons of a transformers model block by block; return a smaller model.

    Parameters
    ----------
    model : transformers PreTrainedModel
        BERT/RoBERTa, GPT-2, OPT or LLaMA/Mistral/Qwen style (base model or a
        model with a head). Not modified, and never copied whole: the pruned
        model is assembled from a copy of the non-block parts and the pruned
        block copies (:mod:`subprune.hf.engine`).
    calibration : dict
        "input_ids" and "attention_mask", each (N, T): unlabeled token sequences
        (:func:`subprune.hf.text.tokenize`). A few hundred sequences is typical.
    config : TransformerPruneConfig, optional
        Defaults to AsymInChange keeping half the heads and FFN neurons.

    Returns
    -------
    TransformerPruneResult
        ``.model`` is physically smaller: sliced q/k/v and up projections,
        refit output and down projections, head counts updated on the attention
        modules. Save it with :func:`subprune.hf.save_pruned`.

    Raises
    ------
    TypeError
        Unsupported model or calibration format.
    ValueError
        Bad keep ratios or calibration shapes.
    """
    model = validation.module("model", model)
    if config is not None and not isinstance(config, TransformerPruneConfig):
        raise TypeError(f"config must be a TransformerPruneConfig, got {type(config).__name__}")
    config = config or TransformerPruneConfig()
    check_calibration(calibration)
    start_time = time.perf_counter()
    method = TRANSFORMER_METHODS[config.method]
    sites = find_transformer_sites(model, config.units)
    plan = _plan(sites, config)
    sites = [s for s in sites if s.name in plan]
    generator = torch.Generator().manual_seed(config.seed)
    common = dict(batch_size=config.batch_size, progress=config.progress, device=config.device,
                  precision=config.precision, cache_dir=config.cache_dir)
    budget = resolve_budget(config)
    batches = math.ceil(calibration["input_ids"].shape[0] / config.batch_size)
    dense_stats, executions = None, 0
    if budget in DENSE_BUDGETS or not method.sequential:  # dense statistics, read before any site is pruned
        dense_stats = collect_transformer_statistics(model, sites, calibration, **common)
        executions = (max((s.layer for s in sites), default=-1) + 1) * batches
    if budget in DENSE_BUDGETS or config.params is not None:
        plan = budget_plan(model, sites, plan, config, dense_stats or {})
        if not method.asymmetric:  # a fully kept site changes nothing without an upstream target to absorb
            plan = {name: k for name, k in plan.items() if k < get_site(sites, name).channels}
        sites = [s for s in sites if s.name in plan]

    def prune_site(work: nn.Module, site: TransformerSite, stats: GramStatistics, k: int) -> SiteReport:
        return _prune_site(work, site, stats, k, config, generator)

    run = prune_blocks(model, sites, plan, calibration, prune_site, sequential=method.sequential,
                       asymmetric=method.asymmetric, statistics=None if method.sequential else dense_stats,
                       description=method.name, residual=config.target == "residual", **common)
    return TransformerPruneResult(run.model, run.sites, config, time.perf_counter() - start_time,
                                  block_executions=executions + run.block_executions,
                                  batches=batches,
                                  timings=run.seconds)


__all__ = [
    "FFN",
    "HEADS",
    "TRANSFORMER_METHODS",
    "TransformerPruneConfig",
    "TransformerPruneResult",
    "collect_transformer_statistics",
    "prune_transformer",
]
