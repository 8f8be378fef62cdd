"""Streaming second-moment statistics of consumer inputs.

A consumer's input matrix B (M x d) has one row per sample (Linear) or per
unfolded patch (Conv2d, with the consumer's own kernel, stride, padding and
dilation). The solver needs only G = B^T B, and for the asymmetric target
(AsymInChange) C = B^T A and A^T A, where A is the input of the same consumer in
the original model on the same samples. These are sums over rows, so they are
accumulated batch by batch and the activations are thrown away: memory is O(d^2)
whatever the number of samples (docs/how-it-works.md, "Gram form"). Like scikit-learn's
``IncrementalPCA.partial_fit``: ``update`` adds to running sums, results live in
attributes ending in ``_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subprune.calibration import forward
from subprune.convs import explicit_padding

# Unfolded patches of one chunk are kept below this many bytes (float64).
DEFAULT_CHUNK_BYTES = 64 * 2**20

# precision="mixed": each product B^T B is formed in float32 over at most this many rows, then added
# to the float64 sums. Error of one block, per entry: |dG_ij| <= r u |b_i|^T |b_j| with r rows and
# u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.5), i.e. a relative
# error below 4096 * 2^-24 = 2.4e-4 for inputs of one sign (post-ReLU); measured on ReLU features
# it is about 5e-8 (Frobenius, tests/test_scale.py). The float64 sum of the blocks adds nothing
# that matters.
MIXED_BLOCK_ROWS = 4096
PRECISIONS = ("float64", "mixed")

# float64 G = B^T B is symmetric: it is summed on its upper block triangle only, in column blocks of this
# width (about (k + 1) / 2k of the products for k blocks; 0.60x the CPU time of one full product at
# d = 1536 and 0.70x at d = 576, 2,048 rows, one thread), and the lower triangle is copied from the upper
# one when G is read. Each block is the same product as the matching block of the full B^T B, with the
# same inner dimension (the rows), so the sums are the same (bit for bit with MKL in tests/test_statistics_fast.py).
SYMMETRIC_BLOCK = 192


class NonFiniteActivationError(ValueError):
    """A consumer input holds NaN or infinite values."""


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the inputs it needs are read."""


def consumer_input_rows(
    module: nn.Module, x: Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Tensor]:
    """Rows of the consumer input matrix B, in chunks of bounded size.

    Parameters
    ----------
    module : nn.Linear or nn.Conv2d
        The consumer.
    x : Tensor
        Its input: (..., d) for Linear, (N, C, H, W) for Conv2d.
    chunk_bytes : int
        Upper bound on the float64 bytes of one yielded chunk (at least one
        sample per chunk).

    Yields
    ------
    Tensor of shape (rows, d), float64
        For Conv2d, d = C * kh * kw in channel-major order (the order of
        ``weight.reshape(out, -1)``) and rows are all patches of a chunk of samples.

    Raises
    ------
    TypeError
        If the module is neither Linear nor Conv2d.
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])  # (M, d)
        step = max(1, chunk_bytes // (8 * rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            yield rows[start : start + step].to(torch.float64)
    elif isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        padding = module.padding
        if isinstance(padding, str) or type(module).forward is not nn.Conv2d.forward:
            x = F.pad(x, explicit_padding(module, x))  # "same" padding, or a subclass's own (subprune.convs)
            padding = (0, 0)
        h_out = (x.shape[2] + 2 * padding[0] - module.dilation[0] * (kh - 1) - 1)
        w_out = (x.shape[3] + 2 * padding[1] - module.dilation[1] * (kw - 1) - 1)
        patches = (h_out // module.stride[0] + 1) * (w_out // module.stride[1] + 1)
        per_sample = 8 * patches * x.shape[1] * kh * kw
        step = max(1, chunk_bytes // per_sample)
        for start in range(0, x.shape[0], step):
            cols = F.unfold(
                x[start : start + step].to(torch.float64),
                module.kernel_size,
                dilation=module.dilation,
                padding=padding,
                stride=module.stride,
            )  # (n, C kh kw, L)
            yield cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (n L, C kh kw)
    else:
        raise TypeError(f"consumer must be nn.Linear or nn.Conv2d, got {type(module).__name__}")


class GramStatistics:
    """Running sums G = B^T B and, for an asymmetric target, C = B^T A and A^T A.

    Parameters
    ----------
    dim : int
        d, the consumer's number of input features (columns of B).
    asymmetric : bool
        Also accumulate C = B^T A and A^T A (AsymInChange).
    device : torch.device or str
        Where the float64 accumulators live.
    name : str
        Consumer name, used in error messages.
    sums : bool
        Also accumulate the column sums of B (and A): the first moments that a
        consumer bias needs (:meth:`centred`, :meth:`bias_shift`, FLAP's variance).
    target_weight : Tensor of shape (d, m), optional
        Asymmetric only: the one consumer weight W whose target energy
        ||A W||_F^2 will be asked for. Then that energy is summed directly,
        batch by batch, and A^T A (a third d x d product per batch, used for
        nothing else) is not formed: ``target_gram_`` stays None and
        :meth:`target_energy` accepts only this weight. The selection and the
        refit read only G and C, so they are unchanged.
    precision : {"float64", "mixed"}
        "float64": every product in float64 (the reference). "mixed": each
        block of at most ``MIXED_BLOCK_ROWS`` rows is multiplied in float32 (TF32
        off) and added to float64 sums, relative error bounded as for
        ``MIXED_BLOCK_ROWS``. Meant for GPUs whose float64 throughput is a small
        fraction of float32; on a CPU it saved only 10-30% (d = 512, one thread).

    Attributes
    ----------
    gram_ : Tensor of shape (d, d), float64
    cross_ : Tensor of shape (d, d), float64, or None
    target_gram_ : Tensor of shape (d, d), float64, or None
        None when symmetric, or when ``target_weight`` is given.
    n_rows_ : int
        Rows M seen so far (samples or patches).
    sum_b_ : Tensor of shape (d,), float64, or None
        Column sums of B (``sums=True``).
    sum_a_ : Tensor of shape (d,), float64, or None
        Column sums of A; ``sum_b_`` itself when symmetric.
    """

    def __init__(self, dim: int, asymmetric: bool = False, device="cpu", name: str = "consumer",
                 precision: str = "float64", sums: bool = False, target_weight: Tensor | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        self.dim, self.asymmetric, self.name, self.precision = dim, asymmetric, name, precision
        zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._gram, self._lower_stale = zeros, False
        self.cross_ = zeros.clone() if asymmetric else None
        if target_weight is not None and (not asymmetric or target_weight.ndim != 2 or target_weight.shape[0] != dim):
            raise ValueError(f"{name}: target_weight must be a ({dim}, m) consumer weight of an asymmetric target")
        self.target_weight = None if target_weight is None else target_weight.detach().to(zeros)
        self.target_gram_ = zeros.clone() if asymmetric and target_weight is None else None
        self._target_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.n_rows_ = 0
        self.sum_b_ = torch.zeros(dim, dtype=torch.float64, device=device) if sums else None
        self.sum_a_ = None if not sums else self.sum_b_.clone() if asymmetric else self.sum_b_

    @property
    def gram_(self) -> Tensor:
        """G = B^T B, shape (d, d), float64 (its lower triangle is filled in from the upper one here)."""
        if self._lower_stale:
            _mirror_upper_(self._gram)
            self._lower_stale = False
        return self._gram

    @gram_.setter
    def gram_(self, value: Tensor) -> None:
        self._gram, self._lower_stale = value, False

    def update(self, b: Tensor, a: Tensor | None = None, energy: Tensor | float | None = None) -> None:
        """Add a chunk of rows.

        Parameters
        ----------
        b : Tensor of shape (rows, d)
            Rows of B (the model being pruned).
        a : Tensor of shape (rows, d), optional
            The same rows of A (the original model); required iff asymmetric.
        energy : scalar Tensor or float, optional
            With a ``target_weight``: ||A W||_F^2 of these rows, already known to the caller (e.g.
            the squared output of the dense consumer, which the dense forward computes anyway;
            :mod:`subprune.hf.engine`); then the product A W is not formed again here.

        Raises
        ------
        ValueError
            On a wrong width or a missing/unexpected ``a``, or an ``energy`` without ``target_weight``.
        NonFiniteActivationError
            If a chunk holds NaN or infinite values (read off the diagonals of the updated sums,
            which hold sum_r b_ri^2 and sum_r b_ri a_ri: non-finite iff column i of the chunk
            or an earlier one is; the sums are not usable after this error).
        """
        if b.ndim != 2 or b.shape[1] != self.dim:
            raise ValueError(f"{self.name}: expected rows of width {self.dim}, got {tuple(b.shape)}")
        if (a is not None) != self.asymmetric or (a is not None and a.shape != b.shape):
            raise ValueError(f"{self.name}: the target rows must be given iff asymmetric, same shape")
        if energy is not None and (a is None or self.target_weight is None):
            raise ValueError(f"{self.name}: a precomputed energy needs asymmetric statistics with a target_weight")
        if self.precision == "mixed":
            self._update_mixed(b, a, energy)
        else:
            b = b.to(self._gram)
            _add_gram_(self._gram, b)
            self._lower_stale = True
            if a is not None:
                a = a.to(self._gram)
                self.cross_.addmm_(b.T, a)
                if self.target_weight is None:
                    self.target_gram_.addmm_(a.T, a)
                elif energy is None:
                    self._target_energy += (a @ self.target_weight).square().sum()
        if energy is not None:
            self._target_energy += energy
        self._check_finite(a is not None)
        if self.sum_b_ is not None:
            self.sum_b_ += b.sum(0, dtype=torch.float64).to(self.sum_b_.device)
            if a is not None:
                self.sum_a_ += a.sum(0, dtype=torch.float64).to(self.sum_a_.device)
        self.n_rows_ += b.shape[0]

    def _check_finite(self, paired: bool) -> None:
        """NonFiniteActivationError if a diagonal of the sums (or the summed energy) is not finite.

        G_ii = sum_r b_ri^2 is NaN or inf iff some b_ri is (float32 inputs cannot overflow a float64
        square sum); C_ii = sum_r b_ri a_ri is then non-finite iff some a_ri is (NaN, or inf times
        any b_ri, 0 included). O(d) instead of a pass over every input element.
        """
        checks = [("input", self._gram.diagonal())]
        if paired:
            checks.append(("dense-model input", self.cross_.diagonal() if self.cross_ is not None else None))
            if self.target_weight is not None:
                checks.append(("dense-model input", self._target_energy.reshape(1)))
        for label, t in checks:
            if t is not None and not bool(torch.isfinite(t).all()):
                raise NonFiniteActivationError(
                    f"the {label} of {self.name} holds NaN or infinite values; check the "
                    "calibration data (normalisation, dtype) and the model's weights"
                )

    def _update_mixed(self, b: Tensor, a: Tensor | None, energy=None) -> None:
        """Float32 products over blocks of ``MIXED_BLOCK_ROWS`` rows, summed in float64."""
        device = self._gram.device
        with _full_float32_matmul():
            for start in range(0, b.shape[0], MIXED_BLOCK_ROWS):
                b32 = b[start : start + MIXED_BLOCK_ROWS].to(device=device, dtype=torch.float32)  # (r, d)
                self._gram += b32.T @ b32
                if a is not None:
                    a32 = a[start : start + MIXED_BLOCK_ROWS].to(device=device, dtype=torch.float32)
                    self.cross_ += b32.T @ a32
                    if self.target_weight is None:
                        self.target_gram_ += a32.T @ a32
                    elif energy is None:
                        self._target_energy += (a32 @ self.target_weight.float()).double().square().sum()

    def add_(self, other: GramStatistics) -> GramStatistics:
        """Add another accumulator's sums in place (e.g. from another shard)."""
        self.gram_ += other.gram_
        if self.asymmetric:
            self.cross_ += other.cross_
            if self.target_gram_ is not None:
                self.target_gram_ += other.target_gram_
            self._target_energy += other._target_energy
        if self.sum_b_ is not None:
            self.sum_b_ += other.sum_b_
            if self.asymmetric:
                self.sum_a_ += other.sum_a_
        self.n_rows_ += other.n_rows_
        return self

    def tensors(self) -> list[Tensor]:
        """The accumulators, for an all-reduce."""
        sums = [self.sum_b_, self.sum_a_ if self.asymmetric else None]
        energy = self._target_energy.reshape(1) if self.target_weight is not None else None  # a view: reduced in place
        return [t for t in (self.gram_, self.cross_, self.target_gram_, energy, *sums) if t is not None]

    @property
    def gram(self) -> GramStatistics:
        """The statistics themselves (the ``.gram`` of the former transformer ``SiteMoments``)."""
        return self

    @property
    def mean_b_(self) -> Tensor:
        """Column means of B, shape (d,), float64; ValueError without ``sums``."""
        return self._sums("b") / max(self.n_rows_, 1)

    def _sums(self, which: str) -> Tensor:
        if self.sum_b_ is None:
            raise ValueError(f"{self.name}: first moments were not accumulated (GramStatistics(..., sums=True))")
        return self.sum_b_ if which == "b" else self.sum_a_

    def centred(self, weight: Tensor) -> tuple[Tensor, Tensor | None, float]:
        """Covariance form (G_c, C_c, ||(A - 1 mu_A) W||^2): the objective with a free consumer bias.

        Least squares with an intercept equals least squares on centred data, so
        greedy and refit on these statistics choose and fit as if the consumer
        bias were refit too; the bias itself is :meth:`bias_shift`. Needs ``sums``.

        Parameters
        ----------
        weight : Tensor of shape (d, m)

        Returns
        -------
        gram_c : Tensor of shape (d, d)
        cross_c : Tensor of shape (d, d) or None (symmetric)
        target_energy : float
        """
        m = max(self.n_rows_, 1)
        mu_b, mu_a = self._sums("b") / m, self._sums("a") / m
        gram_c = self.gram_ - m * torch.outer(mu_b, mu_b)
        cross_c = None if self.cross_ is None else self.cross_ - m * torch.outer(mu_b, mu_a)
        if self.target_weight is not None:  # ||(A - 1 mu_A) W||^2 = ||A W||^2 - m ||mu_A W||^2
            mu_w = mu_a @ self.target_weight
            return gram_c, cross_c, self.target_energy(weight) - m * float(mu_w.square().sum())
        target = self.gram_ if self.target_gram_ is None else self.target_gram_
        target_c = target - m * torch.outer(mu_a, mu_a)
        w = weight.to(target_c)
        return gram_c, cross_c, float((w * (target_c @ w)).sum())

    def bias_shift(self, weight: Tensor, cols: Tensor, new_weight: Tensor) -> Tensor:
        """mu_A W - mu_B[cols] W', shape (m,): add to the consumer bias after an intercept fit (needs ``sums``).

        Parameters
        ----------
        weight : Tensor of shape (d, m)
            The old consumer weight.
        cols : Tensor of shape (d',), int64
            The kept columns.
        new_weight : Tensor of shape (d', m)
        """
        m = max(self.n_rows_, 1)
        return ((self._sums("a") / m) @ weight.to(torch.float64)
                - (self._sums("b")[cols] / m) @ new_weight.to(torch.float64))

    def target_energy(self, weight: Tensor) -> float:
        """||A W||_F^2 for a weight W of shape (d, m) (A = B when symmetric).

        Raises
        ------
        ValueError
            If the statistics summed the energy of another ``target_weight``.
        """
        if self.target_weight is not None:
            if weight.shape != self.target_weight.shape or not torch.equal(weight.to(self.target_weight),
                                                                           self.target_weight):
                raise ValueError(f"{self.name}: these statistics hold ||A W||^2 of their target_weight only")
            return float(self._target_energy)
        target = self.gram_ if self.target_gram_ is None else self.target_gram_
        w = weight.to(target)
        return float((w * (target @ w)).sum())


def _add_gram_(gram: Tensor, b: Tensor) -> None:
    """gram[i, j] += (B^T B)[i, j] for j >= i's column block: the upper block triangle (:data:`SYMMETRIC_BLOCK`).

    ``gram`` (d, d) and ``b`` (rows, d) of one dtype and device; the diagonal blocks are summed whole,
    the blocks below them are left alone (:func:`_mirror_upper_` fills them in).
    """
    d = b.shape[1]
    if d <= SYMMETRIC_BLOCK:
        gram.addmm_(b.T, b)
        return
    for lo in range(0, d, SYMMETRIC_BLOCK):
        hi = min(lo + SYMMETRIC_BLOCK, d)
        gram[lo:hi, lo:].addmm_(b[:, lo:hi].T, b[:, lo:])


def _mirror_upper_(gram: Tensor) -> None:
    """Copy the blocks above the diagonal blocks of ``gram`` (d, d) onto those below (see :func:`_add_gram_`)."""
    d = gram.shape[0]
    if d <= SYMMETRIC_BLOCK:
        return
    for lo in range(0, d, SYMMETRIC_BLOCK):
        hi = min(lo + SYMMETRIC_BLOCK, d)
        gram[hi:, lo:hi] = gram[lo:hi, hi:].T


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full float32, not TF32 or bfloat16 passes, restored on exit."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def capture_inputs(
    modules: dict[str, nn.Module],
    callback: Callable[[str, Tensor], None],
    stop_after: str | None = None,
    detach: bool = True,
) -> Iterator[None]:
    """Forward pre-hooks that hand each module's first input to ``callback``.

    Parameters
    ----------
    modules : dict name -> module
    callback : callable(name, input_tensor)
    stop_after : str, optional
        Raise :class:`StopForward` after this module's input is captured, so a
        forward pass stops as soon as the statistics it is run for are read.
    detach : bool, default True
        Hand over detached inputs; False keeps them attached to the autograd
        graph (for gradient-based scores such as ActGrad).

    Hooks are removed in ``finally``; nothing is stored on the modules.
    """

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            callback(name, args[0].detach() if detach else args[0])
            if name == stop_after:
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_paired(
    model: nn.Module,
    dense: nn.Module | None,
    consumers: dict[str, nn.Module],
    dense_consumers: dict[str, nn.Module],
    run: Callable[[nn.Module], None],
    stop_after: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inputs of ``consumers`` in ``model`` (B) and, if ``dense`` is given, of ``dense_consumers`` (A).

    ``run(m)`` makes one forward pass of ``m`` on the current batch; both models see
    the same batch, which is what pairs the rows of B and A (AsymInChange's C = B^T A).

    Returns
    -------
    inputs, targets : dict name -> Tensor
        ``targets`` is empty when ``dense`` is None.
    """
    inputs: dict[str, Tensor] = {}
    targets: dict[str, Tensor] = {}
    with capture_inputs(consumers, inputs.__setitem__, stop_after):
        run(model)
    if dense is not None:
        with capture_inputs(dense_consumers, targets.__setitem__, stop_after):
            run(dense)
    return inputs, targets


def run_to_capture(model: nn.Module, batch) -> None:
    """Run ``model(batch)`` (a Tensor or a :class:`subprune.calibration.Batch`) under no_grad.

    :class:`StopForward` is treated as the normal end.
    """
    with torch.no_grad():
        try:
            forward(model, batch)
        except StopForward:
            pass
