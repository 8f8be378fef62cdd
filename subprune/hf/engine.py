"""The block engine: prune a transformer block by block, in one pass over the calibration set.

As SparseGPT, Wanda and FLAP do for decoders, the calibration set goes through
the embedding once; the inputs of the current block are cached (float32, on
the CPU) and every block is then handled on its own:

1. a working copy of the block is made (on the compute device; the user's
   model is never modified and never copied whole);
2. the statistics of the block's sites are collected from the cached inputs,
   heads first: for Seq/Asym the FFN statistics are read from the block with
   its heads already pruned and refit (AsymInChange: the dense stream is run
   through the still-dense copy side by side, for the targets A);
3. each site is pruned by the caller's ``prune_site`` function (selection,
   refit, surgery: :mod:`subprune.hf.prune`);
4. the cached inputs are pushed through the pruned block (and the dense block,
   for Asym) and become the next block's inputs.

Block executions per batch of sequences: LayerInChange 1 (statistics of the
dense model: the dense block's output is the next input); Seq and the
baselines 2 (heads statistics, stopped at the output projection; FFN
statistics, whose output is then corrected for the pruned FFN: every
supported block ends in [a norm of] ``residual + down_proj(...)``, see
:func:`subprune.hf.architectures.ffn_output_norm`); AsymInChange 3 (plus the
dense stream). Consumer outputs that a block execution computes are not computed again: the FFN swap subtracts the
old consumer output captured during the FFN statistics run, and AsymInChange's target energies
||A W||^2 are the squared outputs of the dense consumers in the dense-stream run (consumers
without a bias; float32 outputs summed in float64, which moves only the reported f(S), by float32
rounding). The float64 Gram sums are formed on their upper block triangle
(:data:`subprune.statistics.SYMMETRIC_BLOCK`). Memory: the user's model, the parts of
the pruned model built so far (embeddings and pruned blocks), one block's
working copy, and the caches: the block inputs (N x T x hidden, twice for
Asym, plus the next block's) and, for the FFN site, its consumer inputs
(N x T x FFN width; Asym also keeps the dense model's, real tokens only) and the old FFN
output (N x T x hidden).

The pruned model is assembled from a copy of everything that is not a block
(embeddings, final norm, head; tied weights stay tied) and the pruned blocks.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from subprune.core.site import SiteReport
from subprune.devices import eval_mode, to_device
from subprune.hf.architectures import FFN, HEADS, TransformerSite, blocks, consumer_weight, ffn_output_norm
from subprune.hf.residual import ResidualStatistics
from subprune.solver import group_columns
from subprune.statistics import GramStatistics, StopForward, capture_inputs
from subprune.surgery import get_module

log = logging.getLogger(__name__)

PruneSiteFn = Callable[[nn.Module, TransformerSite, GramStatistics, int], SiteReport]

# keys of captured consumer outputs beside the captured inputs (site names never start with these)
ENERGY, OLD = "energy:", "old output:"


def site_moments(dim: int, asymmetric: bool, device, name: str, precision: str = "float64",
                 target_weight: Tensor | None = None) -> GramStatistics:
    """Empty statistics of one transformer site: Gram sums and column sums (means for biases and FLAP).

    Asymmetric statistics of a site whose dense consumer weight W is known take it as
    ``target_weight``: ||A W||^2 is then summed directly and A^T A is never formed (one d x d
    product per batch fewer; :class:`subprune.statistics.GramStatistics`).
    """
    return GramStatistics(dim, asymmetric, device, name, precision, sums=True, target_weight=target_weight)


SiteMoments = GramStatistics  # the former name of a transformer site's statistics (now with ``sums=True``)


class ActivationStore:
    """Where the engine keeps its activation caches: in memory, or spilled to memory-mapped files.

    With a ``directory``, every cached tensor (block inputs, FFN consumer
    inputs) is copied into a file there, mapped into memory
    (``torch.from_file(shared=True)``) and unlinked at once: the operating
    system pages it in and out as memory allows, and nothing is left behind,
    even when the run is killed. The values are the same float32 numbers as in
    memory, so the results are identical.

    Parameters
    ----------
    directory : str or Path, optional
        An existing directory on a disk with room for the caches (see
        docs/llm.md, "Memory"); None keeps them in memory.

    Attributes
    ----------
    spilled_bytes_ : int
        Bytes written to mapped files so far.

    Raises
    ------
    ValueError
        If ``directory`` is not an existing directory.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None and not self.directory.is_dir():
            raise ValueError(f"cache directory {str(self.directory)!r} does not exist: create it, or pass "
                             "cache_dir=None (CLI: leave out --cache-dir) to keep the caches in memory")
        self.spilled_bytes_ = 0
        self._files = 0

    def keep(self, tensor: Tensor) -> Tensor:
        """``tensor`` as float32 on the CPU, in memory or in a mapped file; same shape and values."""
        tensor = tensor.detach().to("cpu", torch.float32)
        if self.directory is None:
            return tensor
        path = self.directory / f"subprune-cache-{os.getpid()}-{id(self)}-{self._files}.f32"
        self._files += 1
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=torch.float32)
        path.unlink()  # the mapping keeps the pages; no file outlives the run
        mapped = mapped.view(tensor.shape)
        mapped.copy_(tensor)
        self.spilled_bytes_ += tensor.numel() * 4
        return mapped


@dataclass
class CachedBatches:
    """The calibration set at the input of one block, batch by batch.

    Attributes
    ----------
    hidden : list of Tensor of shape (B, T, hidden), float32, on the CPU
        The block inputs (hidden states) of each batch.
    extra_args : list of tuple
        Positional arguments of the block call after the hidden states.
    kwargs : list of dict
        Keyword arguments of the block call (attention mask, positions, rotary
        embeddings), the same for every block; on the device of the user's model.
    real : list of Tensor of shape (B, T), bool
        Tokens whose attention mask is 1: only these rows enter the statistics.
    """

    hidden: list[Tensor]
    extra_args: list[tuple]
    kwargs: list[dict]
    real: list[Tensor]

    def with_hidden(self, hidden: list[Tensor]) -> CachedBatches:
        return CachedBatches(hidden, self.extra_args, self.kwargs, self.real)


@dataclass
class BlockRun:
    """What :func:`prune_blocks` returns.

    Attributes
    ----------
    model : nn.Module
        The pruned model (on the device of the input model).
    sites : list of SiteReport
        In forward order.
    block_executions : int
        Forward calls of a transformer block, all blocks and batches together
        (partial calls, stopped once the statistics are read, included).
    batches : int
        Batches of calibration sequences.
    seconds : dict str -> float
        Wall-clock of the embedding pass ("embed"), the block executions
        ("forward") and the per-site selection, refit and surgery ("sites").
    """

    model: nn.Module
    sites: list[SiteReport]
    block_executions: int
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)


def _batches(calibration: Mapping[str, Tensor], batch_size: int, device) -> Iterator[dict[str, Tensor]]:
    n = calibration["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in calibration.items()}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        yield batch


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_calibration(model: nn.Module, calibration: Mapping[str, Tensor], batch_size: int,
                      store: ActivationStore | None = None) -> CachedBatches:
    """Run the calibration set through the model up to its first block, once; cache the block's inputs.

    A forward pre-hook on the first block records its arguments and stops the
    pass (:class:`subprune.statistics.StopForward`): nothing after the
    embedding (and the mask and position computation) runs.

    Parameters
    ----------
    model : transformers model (with or without a head)
    calibration : dict with "input_ids" (N, T) and optionally "attention_mask" (N, T)
    batch_size : int
    store : ActivationStore, optional
        Where the block inputs are kept (default: in memory).

    Returns
    -------
    CachedBatches
        ceil(N / batch_size) batches.

    Raises
    ------
    RuntimeError
        If the forward pass never reaches the first block.
    """
    _, layers = blocks(model)
    device = model_device(model)
    store = store or ActivationStore()
    takes_cache_flag = "use_cache" in inspect.signature(model.forward).parameters
    captured: dict = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        captured["args"], captured["kwargs"] = args, kwargs
        raise StopForward

    cache = CachedBatches([], [], [], [])
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)  # before any user hook
    try:
        for batch in _batches(calibration, batch_size, device):
            try:
                model(**batch, **({"use_cache": False} if takes_cache_flag else {}))
            except StopForward:
                pass
            if "args" not in captured:
                raise RuntimeError("the model's forward pass never reached its first transformer block")
            args, kwargs = captured.pop("args"), dict(captured.pop("kwargs"))
            hidden = args[0] if args else kwargs.pop("hidden_states")
            cache.hidden.append(store.keep(hidden))
            cache.extra_args.append(tuple(args[1:]))
            cache.kwargs.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
            cache.real.append(batch["attention_mask"].bool().cpu())
    finally:
        handle.remove()
    return cache


def _real_rows(x: Tensor, real: Tensor, name: str) -> Tensor:
    """Rows of a consumer input (B, T, d) or (B * T, d) (OPT flattens) at real tokens: (tokens, d)."""
    rows = x.reshape(-1, x.shape[-1])  # (B T, d)
    if rows.shape[0] != real.numel():
        raise ValueError(f"{name}: consumer input {tuple(x.shape)} does not line up with the mask {tuple(real.shape)}")
    return rows[real.reshape(-1).to(rows.device)]


@torch.no_grad()
def _attention_sum(out: Tensor, consumer: nn.Module, x: Tensor, real: Tensor, name: str) -> Tensor:
    """The residual sum before the FFN of a pre-norm block, out - down(x), at real tokens: (tokens, hidden), CPU."""
    ffn_out = consumer(x.to(next(consumer.parameters()).dtype)).to("cpu", torch.float32)
    return _real_rows(out - ffn_out.reshape(out.shape), real, name)


class _Executor:
    """Runs one block on one cached batch, counting executions and their time."""

    def __init__(self, cache: CachedBatches, device: torch.device, store: ActivationStore | None = None):
        self.cache, self.device, self.store = cache, device, store or ActivationStore()
        self.executions, self.seconds = 0, 0.0

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: Tensor, index: int, capture: Mapping[str, nn.Module] | None = None,
            stop: str | None = None, outputs: Mapping[str, nn.Module] | None = None
            ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Block output (B, T, hidden) on the CPU (None when stopped) and what was captured.

        The dict holds the inputs of the ``capture`` modules and the outputs of the ``outputs``
        modules (copies, on the compute device), each under its key (the two key sets must differ).
        """
        start = time.perf_counter()
        dtype = next(block.parameters()).dtype
        x = hidden.to(self.device, dtype)
        args = to_device(self.cache.extra_args[index], self.device)
        kwargs = to_device(self.cache.kwargs[index], self.device)
        inputs: dict[str, Tensor] = {}
        out = None
        self.executions += 1
        with capture_inputs(dict(capture or {}), inputs.__setitem__, stop), \
                _capture_outputs(dict(outputs or {}), inputs.__setitem__):
            try:
                out = block(x, *args, **kwargs)
            except StopForward:
                out = None
        if isinstance(out, (tuple, list)):
            out = out[0]
        self.seconds += time.perf_counter() - start
        return (None if out is None else self.store.keep(out)), inputs


@contextlib.contextmanager
def _capture_outputs(modules: dict[str, nn.Module], callback: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Forward hooks that hand a copy of each module's output to ``callback``; removed on exit."""

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            callback(name, output.detach().clone())  # a copy: the block may go on to change its output in place

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _output_is_product(module: nn.Module) -> bool:
    """Whether ``module``'s output is x W exactly as the statistics' target energy ||A W||^2 takes it (no bias)."""
    return type(module) is nn.Linear and module.bias is None


def _energy(output: Tensor, real: Tensor, name: str) -> Tensor:
    """||A W||_F^2 of a batch from the dense consumer's output A W (B, T, m), real tokens only: float64 scalar.

    The dense forward has just computed A W (float32, in the model's dtype); summing its squares in float64
    replaces the float64 product that :meth:`GramStatistics.update` would form again. The value differs
    from that product by float32 rounding (about 1e-7 relative): it enters only the reported objective
    f(S) = kept energy / ||A W||^2, never the selection or the refit (they read G and C alone).
    """
    return _real_rows(output, real, name).to(torch.float64).square().sum()


def _skeleton(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """A copy of ``model`` without copying its blocks: the block list holds the user's blocks until replaced."""
    prefix, layers = blocks(model)
    memo = {id(block): block for block in layers}
    skeleton = copy.deepcopy(model, memo)  # embeddings, norms, head (tied weights stay tied); blocks shared
    return skeleton.eval(), prefix, blocks(skeleton)[1]


def _block_sites(sites: list[TransformerSite], index: int) -> tuple[TransformerSite | None, TransformerSite | None]:
    here = [s for s in sites if s.layer == index]
    heads = next((s for s in here if s.kind == HEADS), None)
    ffn = next((s for s in here if s.kind == FFN), None)
    return heads, ffn


def _relative(name: str, block_name: str) -> str:
    return name.removeprefix(block_name + ".")


@torch.no_grad()
def collect_block_statistics(
    model: nn.Module,
    sites: list[TransformerSite],
    calibration: Mapping[str, Tensor],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "float64",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, GramStatistics], int]:
    """Statistics of the consumer inputs of ``sites`` in the unpruned ``model``, one block at a time.

    The calibration set is embedded once and pushed through each block once
    (up to the last block that holds one of ``sites``); only real tokens
    (attention mask 1) enter the sums.

    Parameters
    ----------
    model : transformers model
        Not modified; with a ``device`` other than its own, each block is copied there while it runs.
    sites : list of TransformerSite
    calibration : dict with "input_ids" (N, T) and "attention_mask" (N, T)
    batch_size, device, progress
    precision : {"float64", "mixed"}
        Accumulation of the Gram sums (:class:`subprune.statistics.GramStatistics`).
    cache_dir : str or Path, optional
        Spill the activation caches to memory-mapped files there (:class:`ActivationStore`).

    Returns
    -------
    stats : dict site name -> GramStatistics
    block_executions : int
    """
    with eval_mode(model):
        return _collect_block_statistics(model, sites, calibration, batch_size, device, progress, precision,
                                         ActivationStore(cache_dir))


def _collect_block_statistics(model, sites, calibration, batch_size, device, progress, precision, store):
    device = torch.device(device) if device is not None else model_device(model)
    cache = embed_calibration(model, calibration, batch_size, store)
    prefix, layers = blocks(model)
    last = max((s.layer for s in sites), default=-1)
    runner = _Executor(cache, device, store)
    stats: dict[str, GramStatistics] = {}
    for i in tqdm(range(last + 1), desc="statistics", disable=not progress, leave=False):
        block = layers[i] if device == model_device(model) else copy.deepcopy(layers[i]).to(device)
        here = [s for s in sites if s.layer == i]
        name = f"{prefix}.{i}"
        modules = {s.name: get_module(block, _relative(s.consumer, name)) for s in here}
        for s in here:
            stats[s.name] = site_moments(consumer_weight(modules[s.name]).shape[0], False, device, s.consumer,
                                         precision)
        hidden = []
        for b in range(len(cache.hidden)):
            out, inputs = runner.run(block, cache.hidden[b], b, modules)
            for s in here:
                stats[s.name].update(_real_rows(inputs[s.name], cache.real[b], s.name))
            hidden.append(out)
        cache = cache.with_hidden(hidden)
    return stats, runner.executions


@torch.no_grad()
def prune_blocks(
    model: nn.Module,
    sites: list[TransformerSite],
    plan: Mapping[str, int],
    calibration: Mapping[str, Tensor],
    prune_site: PruneSiteFn,
    *,
    sequential: bool,
    asymmetric: bool,
    statistics: Mapping[str, GramStatistics] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    description: str = "blocks",
    residual: bool = False,
    precision: str = "float64",
    cache_dir: str | os.PathLike | None = None,
) -> BlockRun:
    """Prune the sites of ``plan`` block by block; return the assembled pruned model.

    Parameters
    ----------
    model : transformers model
        Not modified and not copied whole (see the module docstring).
    sites : list of TransformerSite
        Sites of ``model`` in forward order; those named in ``plan`` are pruned.
    plan : mapping site name -> units kept
    calibration : dict with "input_ids" (N, T) and "attention_mask" (N, T)
    prune_site : callable(model, site, moments, k) -> SiteReport
        Selection, refit and surgery of one site, in place on ``model`` (the
        pruned model under construction, whose block ``site.layer`` is the
        working copy). The per-site method is this function.
    sequential : bool
        Statistics from the model with earlier sites pruned (Seq, Asym,
        baselines); else from the dense model (Layer).
    asymmetric : bool
        Targets from the dense model (AsymInChange): C = B^T A and A^T A.
    statistics : mapping site name -> GramStatistics, optional
        Dense statistics collected beforehand (a curve budget needs them): a
        non-sequential run then executes no block at all.
    batch_size : int
    device : str or torch.device, optional
        Where the working block, its forward passes and the statistics live
        (default: the model's device). Only one block is there at a time; the
        caches stay on the CPU.
    progress : bool
    description : str
    precision : {"float64", "mixed"}
        Accumulation of the Gram sums (:class:`subprune.statistics.GramStatistics`).
    cache_dir : str or Path, optional
        Spill the activation caches to memory-mapped files there (:class:`ActivationStore`).

    residual : bool
        With AsymInChange (``sequential`` and ``asymmetric``): also collect, per
        site, the upstream residual-stream error E = r_dense - r_pruned at the
        sublayer's residual addition (the block input for the heads, the sum
        after attention for the FFN) against its consumer inputs
        (:class:`subprune.hf.residual.ResidualStatistics`), for the residual
        target. Pre-norm blocks only (the residual sum is linear there).

    Returns
    -------
    BlockRun

    Raises
    ------
    ValueError
        If ``residual`` is asked without AsymInChange, or for a post-norm model.
    """
    if residual and not (asymmetric and sequential):
        raise ValueError("the residual-stream target needs the dense stream beside the pruned one: use it with "
                         "AsymInChange (method asym)")
    if residual and ffn_output_norm(model) is not None:
        raise ValueError("the residual-stream target needs a pre-norm model (LLaMA, GPT-2, pre-norm OPT); this "
                         "model normalises the residual sum, so use the default sublayer target")
    with eval_mode(model):
        return _prune_blocks(model, sites, plan, calibration, prune_site, sequential, asymmetric, statistics,
                             batch_size, device, progress, description, precision, ActivationStore(cache_dir),
                             residual=residual)


def _prune_blocks(model, sites, plan, calibration, prune_site, sequential, asymmetric, statistics, batch_size,
                  device, progress, description, precision, store, residual=False) -> BlockRun:
    start = time.perf_counter()
    storage = model_device(model)
    device = torch.device(device) if device is not None else storage
    skeleton, prefix, new_layers = _skeleton(model)
    _, layers = blocks(model)
    planned = [s for s in sites if s.name in plan]
    needs_runs = sequential or statistics is None
    last = max((s.layer for s in planned), default=-1) if needs_runs else -1
    cache = embed_calibration(model, calibration, batch_size, store) if last >= 0 else CachedBatches([], [], [], [])
    seconds = {"embed": time.perf_counter() - start, "sites": 0.0}
    dense_cache = cache if asymmetric else None
    runner = _Executor(cache, device, store)
    norm_name = ffn_output_norm(model)
    reports: list[SiteReport] = []

    def cut(site: TransformerSite, moments: GramStatistics) -> SiteReport:
        site_start = time.perf_counter()
        report = prune_site(skeleton, site, moments, plan[site.name])
        report.seconds = time.perf_counter() - site_start
        seconds["sites"] += report.seconds
        reports.append(report)
        log.info("site %s: kept %d/%d, f(S)=%.4f", site.name, report.kept, site.channels, report.objective)
        return report

    for i in tqdm(range(len(layers)), desc=description, disable=not progress):
        work = copy.deepcopy(layers[i]).to(device).eval()
        new_layers[i] = work
        heads, ffn = _block_sites(planned, i)
        if not needs_runs:  # LayerInChange on statistics collected beforehand: no block runs at all
            for s in (heads, ffn):
                if s is not None:
                    cut(s, statistics[s.name])
            work.to(storage)
            continue
        if i > last:
            work.to(storage)
            continue
        block_name = f"{prefix}.{i}"

        def module(site: TransformerSite, block_name=block_name, work=work) -> nn.Module:
            return get_module(work, _relative(site.consumer, block_name))

        def moments(site: TransformerSite, asym: bool) -> GramStatistics:
            if residual:
                return ResidualStatistics(consumer_weight(module(site)).shape[0], device, site.consumer)
            weight = consumer_weight(module(site))  # (d, m): still the dense consumer when its statistics start
            return site_moments(weight.shape[0], asym, device, site.consumer, precision, weight if asym else None)

        if not sequential:  # LayerInChange: the dense block's statistics; its output is the next input
            here = [s for s in (heads, ffn) if s is not None]
            stats = {s.name: moments(s, False) for s in here}
            hidden = []
            for b in range(len(cache.hidden)):
                out, inputs = runner.run(work, cache.hidden[b], b, {s.name: module(s) for s in here})
                for s in here:
                    stats[s.name].update(_real_rows(inputs[s.name], cache.real[b], s.name))
                hidden.append(out)
            cache = cache.with_hidden(hidden)
            for s in (heads, ffn):
                if s is not None:
                    cut(s, stats[s.name])
            work.to(storage)
            continue

        # Phase 1: heads statistics from the pruned stream (stopped at the output projection); for Asym the
        # dense stream runs through the still-dense copy beside it, for the targets and the next dense input.
        dense_ffn_rows: list[Tensor] = []
        dense_ffn_residual: list[Tensor] = []  # the dense stream's sum after attention, real rows (residual target)
        dense_ffn_energy: list[Tensor] = []  # ||A W||^2 of each batch, from the dense FFN consumer's output
        if heads is not None or asymmetric:
            head_stats = moments(heads, asymmetric) if heads is not None else None
            dense_hidden = []
            for b in range(len(cache.hidden)):
                targets = {}
                if asymmetric:
                    here = [s for s in (heads, ffn) if s is not None]
                    wanted = {s.name: module(s) for s in here}
                    # the dense consumers' outputs A W: their energies, instead of a float64 product A W again
                    energies = {} if residual else {ENERGY + s.name: module(s) for s in here
                                                    if _output_is_product(module(s))}
                    out, targets = runner.run(work, dense_cache.hidden[b], b, wanted, outputs=energies)
                    dense_hidden.append(out)
                    if ffn is not None:
                        dense_ffn_rows.append(store.keep(_real_rows(targets[ffn.name], cache.real[b], ffn.name)))
                        if ENERGY + ffn.name in targets:
                            dense_ffn_energy.append(_energy(targets[ENERGY + ffn.name], cache.real[b], ffn.name))
                        if residual:
                            dense_ffn_residual.append(_attention_sum(out, module(ffn), targets[ffn.name],
                                                                     cache.real[b], ffn.name))
                if heads is not None:
                    _, inputs = runner.run(work, cache.hidden[b], b, {heads.name: module(heads)}, stop=heads.name)
                    a = _real_rows(targets[heads.name], cache.real[b], heads.name) if asymmetric else None
                    rows = _real_rows(inputs[heads.name], cache.real[b], heads.name)
                    if residual:  # the upstream error at the attention's residual addition: the block inputs
                        error = _real_rows(dense_cache.hidden[b] - cache.hidden[b], cache.real[b], heads.name)
                        head_stats.update(rows, a, residual=error)
                    elif ENERGY + heads.name in targets:
                        head_stats.update(rows, a, energy=_energy(targets[ENERGY + heads.name], cache.real[b],
                                                                  heads.name))
                    else:
                        head_stats.update(rows, a)
            if asymmetric:
                dense_cache = dense_cache.with_hidden(dense_hidden)
            if heads is not None:
                cut(heads, head_stats)

        # Phase 2: FFN statistics from the block with pruned heads. Its output, with the old FFN consumer's
        # output swapped for the new one's (the block ends in [norm of] residual + down(x)), is the next input.
        hidden, ffn_inputs, old_outputs, sums = [], [], [], []
        ffn_stats = moments(ffn, asymmetric) if ffn is not None else None
        norm = None if norm_name is None else get_module(work, norm_name)
        for b in range(len(cache.hidden)):
            wanted = {} if ffn is None else {ffn.name: module(ffn)}
            if ffn is not None and norm is not None:
                wanted["norm"] = norm
            # the old FFN consumer's output, as the block computes it, for the swap below (not recomputed there)
            outputs = {} if ffn is None else {OLD + ffn.name: module(ffn)}
            out, inputs = runner.run(work, cache.hidden[b], b, wanted, outputs=outputs)
            hidden.append(out)
            if ffn is not None:
                a = dense_ffn_rows[b] if asymmetric else None
                rows = _real_rows(inputs[ffn.name], cache.real[b], ffn.name)
                if residual:  # the upstream error at the FFN's residual addition: the sums after attention
                    error = dense_ffn_residual[b] - _attention_sum(out, module(ffn), inputs[ffn.name], cache.real[b],
                                                                   ffn.name)
                    ffn_stats.update(rows, a, residual=error)
                elif dense_ffn_energy:
                    ffn_stats.update(rows, a, energy=dense_ffn_energy[b])
                else:
                    ffn_stats.update(rows, a)
                ffn_inputs.append(store.keep(inputs[ffn.name]))
                old_outputs.append(store.keep(inputs[OLD + ffn.name]))
                if norm is not None:
                    sums.append(store.keep(inputs["norm"]))
        if ffn is not None:
            report = cut(ffn, ffn_stats)
            new = module(ffn)
            cols = group_columns(torch.tensor(report.keep), ffn.group_size).to(device)
            dtype = next(new.parameters()).dtype
            for b, x in enumerate(ffn_inputs):
                x = x.to(device, dtype)
                # (B, T, hidden), or (B T, hidden) for OPT; the old output is the very tensor old(x) would give
                delta = new(x.index_select(-1, cols)) - old_outputs[b].to(device, dtype)
                if norm is None:  # in place: the cache may be a mapped file
                    hidden[b].add_(delta.to("cpu", torch.float32).reshape(hidden[b].shape))
                else:
                    total = sums[b].to(device, dtype) + delta.reshape(sums[b].shape)
                    hidden[b] = store.keep(norm(total).reshape(hidden[b].shape))
        cache = cache.with_hidden(hidden)
        work.to(storage)

    seconds["forward"] = runner.seconds
    seconds["total"] = time.perf_counter() - start
    return BlockRun(skeleton, reports, runner.executions, len(cache.hidden), seconds)
