"""Calibration across processes with ``torch.distributed``.

The statistics are sums over calibration rows (docs/how-it-works.md, "Gram form"), so each
process accumulates the Gram sums of its own shard of the calibration set and
one all-reduce per site adds them. Every process then runs the same
deterministic selection, refit and surgery on identical sums, so all processes
hold the same pruned model, equal to a single-process run on all samples (up to
the rounding of a differently ordered float64 sum).

Use it under ``torchrun`` (or any launcher that initialises the default process
group)::

    torch.distributed.init_process_group("gloo")     # "nccl" on GPUs
    part = shard(calibration)                          # this process's samples
    result = prune(model, part, PruneConfig(method="asym", keep=0.25, distributed=True))

Nothing here initialises or destroys a process group: that stays with the caller.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from subprune.statistics import GramStatistics


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def require_initialized() -> None:
    """Raise ValueError unless a default process group is initialised (``distributed=True`` needs one)."""
    if not is_initialized():
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun "
            "and call torch.distributed.init_process_group(backend) before prune(), or set distributed=False"
        )


def shard(samples: Tensor, rank_: int | None = None, world_size_: int | None = None, *,
          strided: bool = False) -> Tensor:
    """This process's part of the calibration set.

    Parameters
    ----------
    samples : Tensor of shape (N, ...)
        The whole calibration set, identical on every process.
    rank_, world_size_ : int, optional
        Defaults: the default process group's rank and size (0 and 1 without one).
    strided : bool, default False
        False: contiguous blocks (the first N mod P ranks get one sample more);
        True: samples rank, rank + P, rank + 2P, ...

    Returns
    -------
    Tensor of shape (N_rank, ...)
        A view of ``samples``; the shards of all ranks partition the N samples.

    Raises
    ------
    ValueError
        If the rank is outside 0..world_size-1 or a shard would be empty.
    """
    r = rank() if rank_ is None else rank_
    p = world_size() if world_size_ is None else world_size_
    if p < 1 or not 0 <= r < p:
        raise ValueError(f"rank={r} must lie in 0..world_size-1 with world_size={p} >= 1")
    n = samples.shape[0]
    if n < p:
        raise ValueError(f"{n} calibration samples cannot be split over {p} processes; use at least {p}")
    if strided:
        return samples[r::p]
    base, extra = divmod(n, p)
    start = r * base + min(r, extra)
    return samples[start : start + base + (1 if r < extra else 0)]


def _communication_device(stats: GramStatistics) -> torch.device:
    """Where the all-reduce buffer must live: CUDA for NCCL, else where the statistics are."""
    if dist.get_backend() == "nccl":
        if stats.gram_.is_cuda:
            return stats.gram_.device
        return torch.device("cuda", torch.cuda.current_device())
    return stats.gram_.device


def all_reduce_statistics(stats: GramStatistics, group=None) -> GramStatistics:
    """Sum ``stats`` over all processes of ``group``, in place; a no-op without a process group.

    The accumulators (G, and C and A^T A when asymmetric) and the row count are
    packed into one float64 buffer and summed with a single
    ``torch.distributed.all_reduce`` (row counts are exact in float64 up to 2^53).

    Parameters
    ----------
    stats : GramStatistics
        This process's sums over its shard; on return, the sums over all shards.
    group : ProcessGroup, optional
        Default: the default (world) group.

    Returns
    -------
    GramStatistics
        ``stats`` itself.

    Raises
    ------
    ValueError
        If the processes' accumulators have different sizes (different models
        or sites on different ranks): detected from an all-reduce of the sizes.
    """
    if not is_initialized():
        return stats
    device = _communication_device(stats)
    tensors = stats.tensors()
    sizes = torch.tensor([t.numel() for t in tensors] + [len(tensors)], dtype=torch.float64, device=device)
    check = torch.stack([sizes, -sizes])  # max == -min iff all ranks agree
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(check[0], -check[1]):
        raise ValueError(f"{stats.name}: the processes hold statistics of different sizes; every rank must "
                         "prune the same model with the same configuration")
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors]
                     + [torch.tensor([float(stats.n_rows_)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    stats.n_rows_ = int(flat[offset].item())
    return stats


def check_same_selection(name: str, keep: Tensor, group=None) -> None:
    """Raise RuntimeError unless every process selected the same sorted channels ``keep`` (k,) at site ``name``.

    A guard, not a fix: the ranks run the same deterministic selection on
    all-reduced sums, so they agree unless the reduction gave the ranks
    different bits or the models differ.
    """
    if not is_initialized():
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine = torch.cat([torch.tensor([keep.numel()]), keep.cpu().long()]).to(torch.float64).to(device)
    length = torch.tensor([float(mine.numel())], dtype=torch.float64, device=device)
    lengths = torch.stack([length, -length])
    dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=group)
    same = bool(lengths[0] == -lengths[1])
    if same:
        both = torch.stack([mine, -mine])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        same = torch.equal(both[0], -both[1])
    if not same:
        raise RuntimeError(f"site {name}: the processes selected different channels; every rank must prune "
                           "the same model (same weights, same configuration and seed)")
