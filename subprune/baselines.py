"""Channel scores of the baselines the paper compares against (El Halabi et al., NeurIPS 2022, Sec. 5).

Each score function maps a :class:`ScoreContext` (the dense model, its pruning
sites, the calibration data) to one score per producer channel and site, higher
meaning more important. The selection functions in :mod:`subprune.methods`
keep the top-scoring channels (or sample them); the pipeline decides how many
per site (per-site budget for the "Layer" methods, a global ranking otherwise).
Scores are computed once, on the dense model, before any site is pruned.

* Random: uniform random scores (a uniformly random subset).
* WeightNorm: L1 norm of the channel's outgoing weights, i.e. of the consumer's
  weight columns of the channel's group (He et al. 2014, "Reshaping deep neural
  network for fast decoding by node-pruning").
* ActGrad: |activation x gradient| of the loss, averaged over the calibration
  data (first-order Taylor criterion, Molchanov et al., ICLR 2017). Uses labels.
* Sensitivity: max over calibration samples of the channel's share of the
  consumer's pre-activation energy (an energy form of the empirical sensitivity
  of Liebenwein et al., ICLR 2020, "Provable filter pruning").
* GreedyFS: greedy forward selection by mini-batch loss (Ye et al., ICML 2020,
  "Good subnetworks provably exist"); uses labels and the per-site budget. Its
  full-data variant draws each step's mini-batch from a large labelled set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subprune.calibration import Batch, Calibration, as_calibration, forward
from subprune.sites import ChannelRange, PruningSite
from subprune.statistics import capture_inputs, run_to_capture
from subprune.surgery import consumer_weight_matrix, get_module

# Candidate masks of greedy forward selection are evaluated in chunks of at most this many input elements.
GREEDY_FS_CHUNK_ELEMENTS = 2**24
# Per-sample contributions Z_c(x) are computed for chunks of samples of at most this many elements.
CHUNK_ELEMENTS = 2**23

LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(outputs: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the batch (per-sample gradients keep their scale).

    Raises
    ------
    ValueError
        If ``labels`` are not integer class indices in 0..outputs.shape[1] - 1
        (pass your own ``loss_fn`` to :func:`subprune.pipeline.prune` for other targets).
    """
    if labels.is_floating_point() or labels.is_complex() or labels.ndim != 1:
        raise ValueError(f"the default loss (cross-entropy) needs integer class labels of shape (N,), got "
                         f"{str(labels.dtype).removeprefix('torch.')} of shape {tuple(labels.shape)}; "
                         "pass class indices or your own loss_fn")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= outputs.shape[-1]):
        raise ValueError(f"labels range over {int(labels.min())}..{int(labels.max())} but the model has "
                         f"{outputs.shape[-1]} outputs; pass class indices in 0..{outputs.shape[-1] - 1}")
    return F.cross_entropy(outputs, labels, reduction="sum")


@dataclass(frozen=True)
class ScoreContext:
    """What a score function may use; nothing here is modified.

    Attributes
    ----------
    model : nn.Module
        The dense model, in eval mode.
    sites : list of PruningSite
        The sites to score.
    calibration : Calibration
        The calibration batches (:class:`subprune.calibration.Calibration`; a
        Tensor of shape (N, ...) or any form ``as_calibration`` takes is converted).
    labels : Tensor of shape (N,) or None
        Class labels of the calibration samples (only for methods that need them).
    loss_fn : callable(outputs, labels) -> scalar Tensor
    batch_size : int
    generator : torch.Generator
        Source of randomness (seeded by the run's seed).
    kept : mapping site name -> int, optional
        The per-site budget, when it is known before scoring (the "Layer"
        methods); methods that build their selection step by step stop there.
    score_data : (Tensor of shape (M, ...), Tensor of shape (M,)), optional
        A larger labelled set, preprocessed as the model expects, for scores
        that evaluate the loss beyond the calibration set (GreedyFS on the full
        training data).
    """

    model: nn.Module
    sites: list[PruningSite]
    calibration: Calibration
    labels: Tensor | None
    loss_fn: LossFn
    batch_size: int
    generator: torch.Generator
    kept: dict[str, int] | None = None
    score_data: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:  # a Tensor (or any form as_calibration takes) becomes a Calibration
        object.__setattr__(self, "calibration", as_calibration(self.calibration, self.model))


ScoreFn = Callable[[ScoreContext], dict[str, Tensor]]


def random_scores(context: ScoreContext) -> dict[str, Tensor]:
    """Uniform random scores in [0, 1), shape (n,) float64 per site, from the context's generator."""
    return {s.name: torch.rand(s.channels, generator=context.generator, dtype=torch.float64) for s in context.sites}


def weight_norm_scores(context: ScoreContext) -> dict[str, Tensor]:
    """L1 norm of each channel's outgoing weights: sum of |W| over its group's consumer columns.

    Returns
    -------
    dict site name -> Tensor of shape (n,), float64
        For a Conv2d consumer, the channel's kh*kw columns of all output
        filters; after a flatten, its H*W columns of the Linear consumer.
    """
    scores = {}
    for s in context.sites:
        total = torch.zeros(s.channels, dtype=torch.float64)
        for ref in s.consumers:  # every consumer's columns of the site (coupled, concatenated, several readers)
            weight = _site_weight(get_module(context.model, ref.module), ref)  # (n g_j, m)
            total += weight.reshape(s.channels, -1).abs().sum(dim=1).double().cpu()  # (n,)
        scores[s.name] = total
    return scores


def _site_weight(consumer: nn.Module, ref: ChannelRange) -> Tensor:
    """The rows of the consumer weight W (d, m) that read the site's channels, shape (span * kernel, m)."""
    return consumer_weight_matrix(consumer)[ref.start * ref.kernel : (ref.start + ref.span) * ref.kernel]


def _channel_view(consumer: nn.Module, x: Tensor, site: PruningSite, ref: ChannelRange) -> Tensor:
    """The site's part of a consumer input as (rows, n, per-unit values): (N, n, width H W) or (M, n, g_j)."""
    if isinstance(consumer, nn.Conv2d):
        return x[:, ref.start : ref.start + ref.span].reshape(x.shape[0], site.channels, -1)  # (N, n, width H W)
    cols = x[..., ref.start * ref.kernel : (ref.start + ref.span) * ref.kernel]
    return cols.reshape(-1, site.channels, site.consumer_group_size(ref))  # (M, n, g_j)


def act_grad_scores(context: ScoreContext) -> dict[str, Tensor]:
    """Mean over calibration samples of |mean over positions of (activation x d loss / d activation)|.

    The activation of a channel is its input to the consumer (after the
    channel-wise operations: BatchNorm, ReLU, pooling). Per sample the products
    are averaged over the channel's spatial positions (or group columns), then
    the absolute value is averaged over samples: Molchanov et al., ICLR 2017,
    Eq. 8 (first-order Taylor expansion of the loss change when the channel is
    removed).

    Returns
    -------
    dict site name -> Tensor of shape (n,), float64

    Raises
    ------
    ValueError
        If the context holds no labels.
    """
    if context.labels is None:
        raise ValueError("ActGrad scores need the labels of the calibration samples")
    model, device = context.model, next(context.model.parameters()).device
    consumers = {ref.module: get_module(model, ref.module) for s in context.sites for ref in s.consumers}
    totals = {s.name: torch.zeros(s.channels, dtype=torch.float64) for s in context.sites}
    n = len(context.calibration)
    for batch in context.calibration.with_labels(context.labels).batches(context.batch_size, device):
        y = batch.labels
        batch = Batch(tuple(_grad_leaf(a) for a in batch.args),
                      {k: _grad_leaf(v) for k, v in batch.kwargs.items()})  # activations need gradients, frozen or not
        inputs: dict[str, Tensor] = {}
        with torch.enable_grad(), capture_inputs(consumers, inputs.__setitem__, detach=False):
            loss = context.loss_fn(batch.run(model), y)
            names = list(inputs)
            grads = torch.autograd.grad(loss, [inputs[c] for c in names], allow_unused=True)
        grad_of = dict(zip(names, grads, strict=True))
        for s in context.sites:
            taylor = torch.zeros((), dtype=torch.float64)  # per sample and unit, summed over the site's consumers
            for ref in s.consumers:
                grad = grad_of[ref.module]
                if grad is not None:
                    product = (inputs[ref.module] * grad).detach().double()
                    taylor = taylor + _channel_view(consumers[ref.module], product, s, ref).mean(dim=2)  # (M, n)
            if taylor.ndim:
                totals[s.name] += taylor.abs().sum(dim=0).cpu()  # (n,)
    return {name: total / n for name, total in totals.items()}


def _grad_leaf(value):
    """A floating Tensor input as a leaf that requires grad; anything else unchanged."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


def sensitivity_scores(context: ScoreContext) -> dict[str, Tensor]:
    """Max over calibration samples of each channel's share of the consumer's pre-activation energy.

    For sample x, channel c contributes Z_c(x) = B_c(x) W_c to the consumer's
    pre-activation (B_c: the channel's consumer-input columns, one row per
    patch; W_c: its weight rows); its share is ||Z_c(x)||^2 / sum_c' ||Z_c'(x)||^2.
    The sensitivity is the largest share over the calibration samples, as the
    empirical sensitivity of Liebenwein et al., ICLR 2020 (Sec. 3), which takes
    the max over samples of a channel's relative contribution to each output.

    Returns
    -------
    dict site name -> Tensor of shape (n,), float64, values in [0, 1]
    """
    model, device = context.model, next(context.model.parameters()).device
    consumers = {ref.module: get_module(model, ref.module) for s in context.sites for ref in s.consumers}
    best = {s.name: torch.zeros(s.channels, dtype=torch.float64) for s in context.sites}
    weights = {
        (s.name, ref.module): _site_weight(consumers[ref.module], ref).double().reshape(
            s.channels, s.consumer_group_size(ref), -1)
        for s in context.sites for ref in s.consumers
    }  # (n, g_j, m_j)
    for x in context.calibration.batches(context.batch_size, device):
        inputs: dict[str, Tensor] = {}
        with torch.no_grad(), capture_inputs(consumers, inputs.__setitem__, detach=False):
            x.run(model)
        for s in context.sites:
            energy = torch.zeros((), dtype=torch.float64)  # (N, n) once summed over the site's consumers
            for ref in s.consumers:
                module, a, g = consumers[ref.module], inputs[ref.module].double(), s.consumer_group_size(ref)
                if isinstance(module, nn.Conv2d):
                    cols = F.unfold(a[:, ref.start : ref.start + ref.span], module.kernel_size,
                                    dilation=module.dilation, padding=module.padding,
                                    stride=module.stride)  # (N, n g, L)
                    rows = cols.reshape(a.shape[0], s.channels, g, -1)  # (N, n, g, L)
                else:
                    a = a[..., ref.start * ref.kernel : (ref.start + ref.span) * ref.kernel]
                    rows = a.reshape(a.shape[0], -1, s.channels, g).permute(0, 2, 3, 1)  # (N, n, g, T)
                w = weights[(s.name, ref.module)].to(rows.device)
                step = max(1, CHUNK_ELEMENTS // (rows[0].numel() // g * w.shape[2]))
                energy = energy + torch.cat([
                    torch.einsum("sngl,ngm->snlm", rows[i : i + step], w).square().sum(dim=(2, 3))
                    for i in range(0, rows.shape[0], step)
                ])  # (N, n)
            share = energy / energy.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            best[s.name] = torch.maximum(best[s.name], share.max(dim=0).values.cpu())
    return best


@contextlib.contextmanager
def _replace_input(module: nn.Module, replacement: Tensor) -> Iterator[None]:
    """A forward pre-hook that feeds ``replacement`` to ``module`` instead of its input."""
    handle = module.register_forward_pre_hook(lambda mod, args: (replacement,))
    try:
        yield
    finally:
        handle.remove()


def _forward_selection(model: nn.Module, site: PruningSite, k: int, loss_fn: LossFn,
                       step_batch: Callable[[int], tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Greedy forward selection at one site; ``step_batch(j)`` gives step j's (inputs, labels, consumer input).

    Returns a Tensor of shape (n,), float64: n - j for the channel chosen at step
    j (0-based), 0 for channels never chosen.
    """
    n, device = site.channels, next(model.parameters()).device
    consumer = get_module(model, site.consumer)
    ref = site.consumers[0]
    if len(site.consumers) != 1 or not (ref.start == 0 and ref.span * ref.kernel == consumer.weight[0].numel()):
        raise ValueError(
            f"GreedyFS evaluates candidates at one consumer that reads only the site's channels; site "
            f"{site.name} has {len(site.consumers)} consumer(s) starting with '{ref.module}' at input "
            f"{ref.start}: use another method for this model or restrict layers to plain sites"
        )
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    score = torch.zeros(n, dtype=torch.float64)
    for step in range(k):
        x, y, a = step_batch(step)
        rows = a.shape[0]
        grouped = a.reshape(rows, n, -1)  # (B, n, per-channel values)
        candidates = (~chosen).nonzero().squeeze(1)  # (c,)
        chunk = max(1, GREEDY_FS_CHUNK_ELEMENTS // a.numel())
        losses = []
        for start in range(0, candidates.numel(), chunk):
            cand = candidates[start : start + chunk]  # (c,)
            masks = chosen.expand(cand.numel(), n).clone()
            masks[torch.arange(cand.numel(), device=device), cand] = True  # (c, n)
            masked = grouped.unsqueeze(0) * masks[:, None, :, None].to(a.dtype)  # (c, B, n, values)
            replacement = masked.reshape(cand.numel() * rows, *a.shape[1:])  # (c B, ...)
            try:
                with torch.no_grad(), _replace_input(consumer, replacement):
                    out = forward(model, x)  # (c B, classes)
            except RuntimeError as exc:
                raise ValueError(
                    f"GreedyFS cannot evaluate candidates of site {site.name} in one batch: the output of "
                    f"'{site.consumer}' meets a tensor computed before it ({exc})"
                ) from exc
            out = out.reshape(cand.numel(), rows, *out.shape[1:])
            losses.extend(float(loss_fn(out[i], y)) for i in range(cand.numel()))
        best = int(candidates[int(torch.tensor(losses).argmin())])
        chosen[best] = True
        score[best] = n - step
    return score


def _consumer_input(model: nn.Module, site: PruningSite, x: Tensor) -> Tensor:
    """The input of ``site``'s consumer when ``model`` runs on ``x`` (the forward stops there)."""
    store: dict[str, Tensor] = {}
    with capture_inputs({site.consumer: get_module(model, site.consumer)}, store.__setitem__, site.consumer):
        run_to_capture(model, x)
    return store[site.consumer]


def greedy_fs_scores(context: ScoreContext) -> dict[str, Tensor]:
    """Greedy forward selection by mini-batch loss, one site at a time on the dense model.

    Starting from no channel, each step adds the channel whose addition gives the
    lowest loss on one calibration mini-batch (batches taken in turn) when the
    site's other channels are zeroed at the consumer's input; all candidates of a
    step are evaluated in one batched forward pass from the consumer on. Ye et
    al., ICML 2020, Alg. 1-2 (layer-wise forward selection), with the other
    layers dense ("Layer" variant). Runs ``kept[site]`` steps per site.

    Returns
    -------
    dict site name -> Tensor of shape (n,), float64
        n - j for the channel chosen at step j (0-based), 0 for channels never
        chosen: the top-k channels are the greedy set.

    Raises
    ------
    ValueError
        Without labels, or if the model combines the consumer's output with a
        tensor computed before it (a residual join): the batched candidate
        evaluation cannot run there.
    """
    if context.labels is None:
        raise ValueError("GreedyFS needs the labels of the calibration samples")
    model, device = context.model, next(context.model.parameters()).device
    batches = [(b, b.labels) for b in context.calibration.with_labels(context.labels).batches(context.batch_size,
                                                                                              device)]
    scores = {}
    for site in context.sites:
        k = site.channels if context.kept is None else context.kept.get(site.name, site.channels)
        cached = [_consumer_input(model, site, x) for x, _ in batches]  # consumer input of each mini-batch

        def step_batch(step: int, cached: list[Tensor] = cached) -> tuple[Tensor, Tensor, Tensor]:
            return (*batches[step % len(batches)], cached[step % len(batches)])

        scores[site.name] = _forward_selection(model, site, k, context.loss_fn, step_batch)
    return scores


def greedy_fs_full_scores(context: ScoreContext) -> dict[str, Tensor]:
    """Greedy forward selection with a fresh mini-batch of a large labelled set at every step.

    As :func:`greedy_fs_scores`, but step j evaluates the candidates on a new
    random mini-batch (``batch_size`` samples, without replacement within the
    batch) drawn from ``context.score_data`` instead of cycling through the few
    calibration batches: the "full training data" variant of LayerGreedyFS that
    the paper compares against (El Halabi et al., NeurIPS 2022, Sec. 5; Ye et
    al., ICML 2020, Alg. 1 draws a new mini-batch per step). The cost is that of
    :func:`greedy_fs_scores` (one mini-batch per step) whatever the size of the
    set, so the whole training split can be passed (50,000 MNIST images).

    Returns
    -------
    dict site name -> Tensor of shape (n,), float64
        As :func:`greedy_fs_scores`.

    Raises
    ------
    ValueError
        Without ``context.score_data`` (pass ``score_data=(images, labels)`` to
        :func:`subprune.pipeline.prune`), or as :func:`greedy_fs_scores`.
    """
    if context.score_data is None:
        raise ValueError("GreedyFS on the full training data needs a labelled evaluation set: pass "
                         "score_data=(inputs of shape (N, ...), labels of shape (N,)) to prune(), e.g. the "
                         "whole training split preprocessed as the model expects")
    images, labels = context.score_data
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"score_data labels must be a Tensor of shape ({images.shape[0]},), "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    model, device = context.model, next(context.model.parameters()).device
    size = min(context.batch_size, images.shape[0])
    scores = {}
    for site in context.sites:
        k = site.channels if context.kept is None else context.kept.get(site.name, site.channels)

        def step_batch(step: int, site: PruningSite = site) -> tuple[Tensor, Tensor, Tensor]:
            idx = torch.randperm(images.shape[0], generator=context.generator)[:size]  # (B,)
            x, y = images[idx].to(device), labels[idx].to(device)
            return x, y, _consumer_input(model, site, x)

        scores[site.name] = _forward_selection(model, site, k, context.loss_fn, step_batch)
    return scores
