"""One least-squares refit of a consumer that several pruning sites feed.

A consumer can read the channels of several sites: the conv after a DenseNet
or Inception concatenation, or a conv reading a residual stream that option-A
shortcuts split into several sites. Each site is still selected on its own
columns, but refitting the consumer one site at a time ignores the correlations
between the sites' columns. Once the last of its sites is cut, the consumer is
refit once on all its kept input columns (docs/how-it-works.md, "The objective", with S = the union
of the kept columns of every site):

    W' = argmin || B_K W' - A W ||_F^2 = (B_K^T B_K)^+ B_K^T A W

B_K is the consumer's input in the pruned model, A W the target:

* LayerInChange (and the baselines, statistics from the dense model): B_K is
  the dense model's input restricted to the kept columns, A W the dense
  model's pre-activation;
* AsymInChange: B_K is the input in the model being pruned, A W the dense
  model's pre-activation;
* SeqInChange: B_K as for Asym, A W the pre-activation in the model as it was
  just before the first of the consumer's sites was cut (a snapshot, freed
  after the refit): earlier sites count as pruned, the consumer's own sites do not.

Only G = B_K^T B_K, H = B_K^T A W and ||A W||^2 are accumulated, batch by batch.

With the staged engine (:mod:`subprune.staged`) as ``inputs`` provider, Seq and Asym
read the consumer's inputs from it instead of running the calibration set from
the input: B_K from one stage run of the pruned model as it is now, A from the
dense stream's run of the closing site (Asym) or from a stage run just before the
first site was cut (Seq, which then keeps a copy of that one consumer, not of the
whole model).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subprune import validation
from subprune.calibration import as_calibration
from subprune.devices import offload_modules
from subprune.sites import ChannelRange, PruningSite
from subprune.solver import group_columns, ridge_value, solve_normal_equations
from subprune.statistics import capture_paired, consumer_input_rows, run_to_capture
from subprune.surgery import ChannelLayout, consumer_weight_matrix, get_module

log = logging.getLogger(__name__)


JOINT_PREFIX = "joint:"


def dense_joint_sites(sites: list[PruningSite], dense: nn.Module) -> list[PruningSite]:
    """One pseudo-site per shared consumer that covers its whole input, for the dense statistics pass.

    LayerInChange and the baselines refit a shared consumer on the dense model's input A only:
    G = B_K^T B_K, H = B_K^T A W and ||A W||^2 are then all parts of A^T A, which the one pass
    that collects the sites' statistics also sums when these pseudo-sites are added to it
    (named ``joint:<consumer>``; pass the result to :class:`JointRefit` as ``dense_statistics``).
    """
    kernels = {ref.module: ref.kernel for s in sites for ref in s.consumers}
    out = []
    for consumer in shared_consumers(sites):
        kernel = kernels[consumer]
        units = consumer_weight_matrix(get_module(dense, consumer)).shape[0] // kernel
        out.append(PruningSite(JOINT_PREFIX + consumer, consumer, consumer, (), units, kernel,
                               consumers=(ChannelRange(consumer, 0, units, kernel),)))
    return out


def shared_consumers(sites: list[PruningSite]) -> dict[str, list[str]]:
    """Consumers read by two or more of ``sites``: consumer name -> names of its sites, in the order given."""
    readers: dict[str, list[str]] = {}
    for site in sites:
        for ref in site.consumers:
            readers.setdefault(ref.module, []).append(site.name)
    return {consumer: names for consumer, names in readers.items() if len(names) > 1}


@dataclass
class _Group:
    consumer: str
    kernel: int  # weight columns per input unit of the consumer
    sites: list[str]
    pruned: bool = False
    reference: nn.Module | None = None  # SeqInChange: snapshot of the model before the first site
    reference_layout: ChannelLayout | None = None
    reference_inputs: list[Tensor] | None = None  # with a provider: the consumer's input per batch in the snapshot


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    """All rows of B for the input ``x`` of ``module``, one tensor (rows, d), float64."""
    return torch.cat(list(consumer_input_rows(module, x, chunk_bytes=2**62)))


class JointRefit:
    """Refits every consumer shared by several sites once, jointly, after its last site is cut.

    Parameters
    ----------
    sites : list of PruningSite
        The sites of the run, in the order they are pruned.
    dense : nn.Module or None
        The dense model (needed unless ``sequential and not asymmetric``).
    sequential, asymmetric : bool
        The method's flags (:class:`subprune.methods.Method`).
    calibration : Calibration or Tensor of shape (N, ...)
    ridge : float
        Relative ridge (times mean(diag G)), as for the per-site refit.
    batch_size, chunk_bytes, device, offload, distributed
        As in :func:`subprune.pipeline.collect_site_statistics`.
    inputs : subprune.staged.StagedStatistics, optional
        Gives the consumer inputs of Seq/Asym (``capture`` and ``dense_inputs``) instead of
        forward passes from the model's input.
    dense_statistics : dict site name -> list of GramStatistics, optional
        Statistics of the :func:`dense_joint_sites` pseudo-sites (already all-reduced when
        distributed): the non-sequential methods' refits then make no forward pass.

    Attributes
    ----------
    results_ : dict consumer name -> float
        f of every joint refit: the share of the target pre-activation energy
        ||A W||^2 the refit weights keep on the calibration set.
    """

    def __init__(self, sites: list[PruningSite], dense: nn.Module | None, sequential: bool, asymmetric: bool,
                 calibration, ridge: float, *, batch_size: int, chunk_bytes: int,
                 device: torch.device, offload: bool = False, distributed: bool = False, inputs=None,
                 dense_statistics=None, **_unused) -> None:
        kernels = {ref.module: ref.kernel for s in sites for ref in s.consumers}
        self.groups = [_Group(c, kernels[c], names) for c, names in shared_consumers(sites).items()]
        self.snapshot = sequential and not asymmetric
        self.from_dense = not sequential
        if dense is None and not self.snapshot and self.groups:
            raise ValueError("the joint refit needs the dense model for this method")
        self.dense, self.calibration, self.ridge = dense, as_calibration(calibration), ridge
        self.batch_size, self.chunk_bytes, self.device = batch_size, chunk_bytes, device
        self.offload, self.distributed = offload, distributed
        self.inputs = None if self.from_dense else inputs
        self.dense_grams = {} if not self.from_dense or dense_statistics is None else {
            g.consumer: dense_statistics[JOINT_PREFIX + g.consumer][0] for g in self.groups
            if JOINT_PREFIX + g.consumer in dense_statistics}
        self.results_: dict[str, float] = {}

    def before(self, site: PruningSite, work: nn.Module, layout: ChannelLayout) -> None:
        """Call before ``site`` is cut: SeqInChange snapshots the model for the groups it opens."""
        opening = [g for g in self.groups if g.sites[0] == site.name]
        if self.snapshot and opening and self.inputs is not None:  # one consumer and its inputs, not the model
            reference_layout = copy.deepcopy(layout)
            for group in opening:
                group.reference = copy.deepcopy(get_module(work, group.consumer))
                group.reference_layout = reference_layout
                group.reference_inputs = self.inputs.capture(group.consumer)
        elif self.snapshot and opening:
            reference, reference_layout = copy.deepcopy(work), copy.deepcopy(layout)
            for group in opening:
                group.reference, group.reference_layout = reference, reference_layout

    def after(self, site: PruningSite, pruned: bool, work: nn.Module, layout: ChannelLayout) -> None:
        """Call after ``site`` was handled (``pruned``: selected and cut); refits the groups it closes."""
        for group in self.groups:
            if site.name not in group.sites:
                continue
            group.pruned = group.pruned or pruned
            if site.name == group.sites[-1]:
                if group.pruned:
                    self._refit(group, work, layout)
                group.reference = group.reference_layout = group.reference_inputs = None

    @torch.no_grad()
    def _refit(self, group: _Group, work: nn.Module, layout: ChannelLayout) -> None:
        name = group.consumer
        module = get_module(work, name)
        reference = group.reference if self.snapshot else self.dense
        ref_module = reference if self.snapshot and self.inputs is not None else get_module(reference, name)
        target_w = consumer_weight_matrix(ref_module).to(self.device, torch.float64)  # (d_A, m_A)
        m = module.weight.shape[0]
        if target_w.shape[1] != m:  # the consumer's own output rows were cut after the reference
            ref_rows = (torch.arange(target_w.shape[1]) if group.reference_layout is None
                        else group.reference_layout.alive(name, "out", target_w.shape[1]))
            out_rows = torch.searchsorted(ref_rows, layout.alive(name, "out", m))
            target_w = target_w[:, out_rows.to(self.device)]
        units = layout.alive(name, "in", target_w.shape[0] // group.kernel)
        kept = group_columns(units, group.kernel).to(self.device)  # (d,) dense columns still held
        d = kept.numel()
        if name in self.dense_grams:  # from A^T A of the dense pass: B_K = A[:, K]
            stat = self.dense_grams[name]
            full = stat.gram_.to(self.device)  # (d_A, d_A)
            gram = full[kept][:, kept]
            cross = full[kept] @ target_w  # (d, m)
            energy = (target_w * (full @ target_w)).sum()
            n_rows = torch.tensor(float(stat.n_rows_), dtype=torch.float64)
        else:
            gram, cross, energy, n_rows = self._sums(group, work, module, ref_module, target_w, kept)
        if int(n_rows) < d:
            log.warning("joint refit of %s: %d calibration rows for %d refit columns: the refit interpolates the "
                        "calibration set; %s", name, int(n_rows), d, validation.interpolation_advice(self.ridge))
        weight = solve_normal_equations(gram, cross, ridge_value(gram, self.ridge))  # (d, m)
        kept_energy = 2 * float((weight * cross).sum()) - float((weight * (gram @ weight)).sum())
        self.results_[name] = kept_energy / float(energy) if float(energy) > 0 else 0.0
        module.weight.copy_(weight.T.reshape(module.weight.shape).to(module.weight))
        log.info("joint refit of %s over the kept columns of %s: f=%.4f", name, ", ".join(group.sites),
                 self.results_[name])

    def _sums(self, group: _Group, work: nn.Module, module: nn.Module, ref_module: nn.Module, target_w: Tensor,
              kept: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """G = B_K^T B_K (d, d), H = B_K^T A W (d, m), ||A W||^2 and the row count, batch by batch."""
        d, m = kept.numel(), target_w.shape[1]
        gram = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        cross = torch.zeros(d, m, dtype=torch.float64, device=self.device)  # B_K^T A W, (d, m)
        energy = torch.zeros((), dtype=torch.float64, device=self.device)
        n_rows = torch.zeros((), dtype=torch.float64, device=self.device)
        for b_input, a_input in self._inputs(group, work, module, ref_module):
            per_sample = 8 * a_input[0].numel() * max(1, target_w.shape[0] // max(1, a_input[0].shape[0]))
            step = max(1, self.chunk_bytes // per_sample)
            for first in range(0, a_input.shape[0], step):
                a = _rows(ref_module, a_input[first : first + step].to(self.device))  # (rows, d_A)
                b = a[:, kept] if b_input is None else _rows(module, b_input[first : first + step].to(self.device))
                target = a @ target_w  # (rows, m)
                gram.addmm_(b.T, b)
                cross.addmm_(b.T, target)
                energy += (target * target).sum()
                n_rows += b.shape[0]
        if self.distributed:
            for tensor in (gram, cross, energy, n_rows):
                torch.distributed.all_reduce(tensor)
        return gram, cross, energy, n_rows

    def _inputs(self, group: _Group, work: nn.Module, module: nn.Module,
                ref_module: nn.Module) -> Iterator[tuple[Tensor | None, Tensor]]:
        """(B input or None, A input) of the consumer, batch by batch: from the provider or forward passes."""
        name = group.consumer
        if self.inputs is not None:
            targets = group.reference_inputs if self.snapshot else self.inputs.dense_inputs(name)
            yield from zip(self.inputs.capture(name), targets, strict=True)
            return
        reference = group.reference if self.snapshot else self.dense
        source = reference if self.from_dense else work
        models = [source] if self.from_dense else [work, reference]
        with offload_modules(models, self.device) if self.offload else contextlib.nullcontext():
            for batch in self.calibration.batches(self.batch_size, self.device):
                if self.from_dense:
                    inputs, _ = capture_paired(source, None, {name: ref_module}, {},
                                               lambda mod, b=batch: run_to_capture(mod, b), name)
                    yield None, inputs[name]
                else:
                    inputs, targets = capture_paired(work, reference, {name: module}, {name: ref_module},
                                                     lambda mod, b=batch: run_to_capture(mod, b), name)
                    yield inputs[name], targets[name]
