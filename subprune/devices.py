"""Compute device, layer-by-layer offloading and peak-memory measurement.

``offload_modules`` runs a model whose weights stay in host memory on a compute
device (a GPU smaller than the model): a forward pre-hook moves one module's own
parameters and buffers to the device just before it runs and a forward hook puts
the host copies back right after, as the one-shot LLM pruners (SparseGPT,
Wanda) do block by block. Only the activations of one calibration batch and one
module's weights are on the device at a time. Hooks live in a context manager
and are removed in ``finally``; the models given are the pipeline's own copies.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The compute device: ``device`` if given, else the device of the model's first parameter.

    Raises
    ------
    ValueError
        If ``device`` is not a device name, or names CUDA when CUDA is not available.
    """
    if device is None:
        first = next(iter(model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def to_device(value, device):
    """Tensors inside ``value`` (tensor, tuple, list, dict, nested) moved to ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _own_tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """(owning dict, name, tensor) of the module's own parameters and buffers (not its children's)."""
    return [(store, name, tensor) for store in (module._parameters, module._buffers)
            for name, tensor in store.items() if tensor is not None]


def _reads_children(module: nn.Module) -> bool:
    """True for built-in torch.nn modules, which may use their children's weights without calling them."""
    return type(module).__module__.startswith("torch.nn.")


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a parameter (as a Parameter) or a buffer."""
    data = tensor.detach().to(device, non_blocking=True)
    return nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data


@contextlib.contextmanager
def offload_modules(models: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Run ``models`` with their weights in host memory and each module's compute on ``device``.

    Every module that owns parameters or buffers gets a pre-hook that moves its
    own tensors to ``device`` and a forward hook that restores the host tensors
    it moved. A built-in ``torch.nn`` module moves its whole subtree (such as
    MultiheadAttention, which reads its ``out_proj`` weight without calling it);
    a user-defined module moves only its own tensors, so a parameter held by the
    top-level model does not pull the whole model onto the device. The inputs
    must already be on ``device``.

    Parameters
    ----------
    models : list of nn.Module
        Models whose weights live on the CPU. While a module runs, its entries in
        ``_parameters`` / ``_buffers`` point to device copies; the host tensors
        (the same objects) are put back after it, and all of them on exit.
    device : torch.device
        The compute device.

    Notes
    -----
    A forward pass cut short (the statistics hooks stop it once they have the
    inputs they need) skips the forward hook of the module it stopped in; its
    tensors stay on the device until the next call of that module or the end of
    the context, where everything is restored.
    """
    moved: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}  # module id -> (store, name, host tensor)
    handles = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if id(module) in moved:
            return
        swaps = []
        for sub in module.modules() if _reads_children(module) else [module]:
            for store, name, tensor in _own_tensors(sub):
                if tensor.device != device:
                    swaps.append((store, name, tensor))
                    store[name] = _moved(tensor, device)
        moved[id(module)] = swaps

    def post_hook(module: nn.Module, args: tuple, output) -> None:
        _restore(moved.pop(id(module), []))

    seen: set[int] = set()
    try:
        for model in models:
            for module in model.modules():
                if id(module) in seen or not _own_tensors(module):
                    continue
                seen.add(id(module))
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for swaps in moved.values():
            _restore(swaps)
        moved.clear()


def _restore(swaps: list[tuple[dict, str, torch.Tensor]]) -> None:
    """Put the host tensors back in their modules."""
    for store, name, host in swaps:
        store[name] = host


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one pruning run.

    Attributes
    ----------
    device : str
        The compute device.
    peak_bytes : int or None
        CUDA: ``torch.cuda.max_memory_allocated`` during the run (tensors only,
        reset at the start). CPU: the process's peak resident set size during
        the run (Linux VmHWM, reset at the start through /proc/self/clear_refs)
        or, where it cannot be reset, over the process's whole life (ru_maxrss).
        None where neither can be read.
    what : str
        Which of these ``peak_bytes`` is.
    """

    device: str
    peak_bytes: int | None
    what: str


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm_bytes() is not None


class MemoryTracker:
    """Measure the peak memory of a block of code on ``device``; read ``.result`` after it ends.

    >>> with MemoryTracker(torch.device("cpu")) as tracker:
    ...     run()
    >>> tracker.result.peak_bytes
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.result: PeakMemory | None = None
        self._rss_reset = False

    def __enter__(self) -> MemoryTracker:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss_reset = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, what = torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
        elif self._rss_reset:
            peak, what = _vm_hwm_bytes(), "process peak RSS during the run (VmHWM)"
        else:
            peak, what = peak_rss_bytes(), "process peak RSS over its life (ru_maxrss)"
        self.result = PeakMemory(str(self.device), peak, what)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout, BatchNorm running statistics frozen) for the block.

    Every module's own training flag is restored on exit, also after an error.
    Shared by the fx pipeline (the user's model as the dense reference), the
    block engine and the evaluation helpers.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.train(training)
