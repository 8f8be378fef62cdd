"""What a Conv2d module computes, read from its behaviour rather than its class.

Ported TensorFlow models (timm's ``Conv2dSame``, ``tf_*`` EfficientNets) and
other libraries subclass ``nn.Conv2d`` with their own ``forward``. Site
discovery treats such a module as the convolution it is when its output on a
probe input equals

* ``F.conv2d`` with its own ``padding`` (a plain convolution), or
* ``F.conv2d`` after TensorFlow's "SAME" padding, computed from the input size
  (``pad = max((ceil(i / s) - 1) s + (k - 1) d + 1 - i, 0)``, the smaller half
  first);

anything else (weight standardisation, a learned mask) is reported. The
statistics then unfold the input with the same explicit padding
(:func:`explicit_padding`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_PROBE_CACHE: dict[tuple, str | None] = {}


def _same_pads(size: tuple[int, int], module: nn.Conv2d) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (left, right, top, bottom) of an input of spatial ``size``."""
    pads = []
    for i, k, s, d in zip(size, module.kernel_size, module.stride, module.dilation, strict=True):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def _plain_pads(size: tuple[int, int], module: nn.Conv2d) -> tuple[int, int, int, int]:
    if isinstance(module.padding, str):  # "same" (stride 1) or "valid", as torch computes them
        if module.padding == "valid":
            return 0, 0, 0, 0
        totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
        return left, right, top, bottom
    ph, pw = module.padding
    return pw, pw, ph, ph


def conv_kind(module: nn.Conv2d, in_shape: tuple[int, ...]) -> str | None:
    """"plain", "same" or None (it computes something else), probed on an input of shape ``in_shape``."""
    if type(module).forward is nn.Conv2d.forward:
        return "plain"
    key = (id(module), tuple(in_shape[1:]), module.weight.data_ptr())
    if key not in _PROBE_CACHE:
        weight = module.weight
        x = torch.randn(1, *in_shape[1:], generator=torch.Generator().manual_seed(0)).to(weight)
        kind = None
        with torch.no_grad():
            try:
                out = module(x)
            except Exception:
                out = None
            for name, pads in (("plain", _plain_pads), ("same", _same_pads)):
                if out is None or module.padding_mode != "zeros":
                    break
                try:
                    ref = F.conv2d(F.pad(x, pads(tuple(x.shape[2:]), module)), weight, module.bias, module.stride, 0,
                                   module.dilation, module.groups)
                except RuntimeError:  # this padding does not even fit the input
                    continue
                if ref.shape == out.shape and torch.allclose(ref, out, atol=1e-4, rtol=1e-4):
                    kind = name
                    break
        _PROBE_CACHE[key] = kind
    return _PROBE_CACHE[key]


def explicit_padding(module: nn.Conv2d, x: Tensor) -> tuple[int, int, int, int]:
    """Padding (left, right, top, bottom) that ``module`` applies to its input ``x`` (N, C, H, W).

    Raises
    ------
    ValueError
        If the module is a Conv2d subclass that is neither a plain nor a "SAME"-padded convolution.
    """
    kind = conv_kind(module, tuple(x.shape))
    size = tuple(x.shape[2:])
    if kind == "plain":
        return _plain_pads(size, module)
    if kind == "same":
        return _same_pads(size, module)
    raise ValueError(f"{type(module).__name__} is not a plain or 'SAME'-padded convolution of its input")


class _ConvCalls(TorchFunctionMode):
    """Records the arguments of every ``F.conv2d`` call made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:  # (input, weight, bias=None, stride, padding, dilation, groups)
            self.calls.append((args[1] if len(args) > 1 else kwargs["weight"],
                               args[2] if len(args) > 2 else kwargs.get("bias")))
        return func(*args, **kwargs)


def effective_conv(module: nn.Conv2d, in_shape: tuple[int, ...]) -> nn.Conv2d | None:
    """The plain convolution that a Conv2d subclass computes, or None if it computes something else.

    A convolution whose ``forward`` re-derives its weight before calling
    ``F.conv2d`` (timm's ``StdConv2d`` and ``ScaledStdConv2d``: weight
    standardisation, Qiao et al. 2019, as in NFNets, Brock et al. 2021) is, for
    fixed parameters, a plain convolution with the weight it passes to
    ``F.conv2d``. That weight and bias are recorded on a probe input of shape
    ``in_shape``, and the convolution is accepted only if it reproduces the
    module's output there (with the module's padding, or TensorFlow's "SAME").

    Parameters
    ----------
    module : nn.Conv2d
        The module, in the state it will be used in (eval mode for inference).
    in_shape : tuple of int
        Shape (N, C_in, H, W) of an input it is called with.

    Returns
    -------
    nn.Conv2d or None
        A new ``nn.Conv2d`` (or :class:`SamePadConv2d`) with the effective weight,
        of shape (C_out, C_in / groups, kh, kw), and bias, on the module's device
        and dtype; None when the module makes other than one ``F.conv2d`` call or
        no such convolution reproduces it.
    """
    if module.padding_mode != "zeros" or len(in_shape) != 4:
        return None
    probe = torch.randn(1, *in_shape[1:], generator=torch.Generator().manual_seed(0)).to(module.weight)
    recorder = _ConvCalls()
    with torch.no_grad():
        try:
            with recorder:
                ref = module(probe)
        except Exception:
            return None
    if len(recorder.calls) != 1:
        return None
    weight, bias = recorder.calls[0]
    if weight.shape != module.weight.shape or (bias is not None and bias.shape != (module.out_channels,)):
        return None
    for name in ("plain", "same"):
        cls = SamePadConv2d if name == "same" else nn.Conv2d
        conv = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                   module.padding if name == "plain" else 0, module.dilation, module.groups,
                   bias=bias is not None).to(module.weight)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
            try:
                got = conv(probe)
            except RuntimeError:
                continue
        if got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
            return conv
    return None


class SamePadConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding, computed from each input's size (as timm's ``Conv2dSame``)."""

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        return F.conv2d(F.pad(x, _same_pads(tuple(x.shape[2:]), self)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


def freeze_conv_weights(model: nn.Module, example: Tensor) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose weight-reparametrising Conv2d subclasses are the plain convolutions they compute.

    Weight-standardised convolutions (timm's ``StdConv2d``, ``ScaledStdConv2d``, as
    in NFNets and BiT) re-standardise their weight over its inputs in every
    forward pass: removing input channels would change every kept weight, so no
    site can refit them (docs/zoo.md). In inference they are a fixed
    convolution; this copy holds that convolution (:func:`effective_conv`), so
    the copy can be pruned and gives the same outputs as ``model`` in eval mode.
    Training the copy no longer standardises its weights.

    Parameters
    ----------
    model : nn.Module
        Left unchanged; the copy is put in eval mode.
    example : Tensor
        One input batch, to record each convolution's input shape.

    Returns
    -------
    (nn.Module, list of str)
        The copy and the qualified names of the convolutions replaced (Conv2d
        subclasses that compute another linear map stay as they are).
    """
    model = copy.deepcopy(model).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and type(m).forward is not nn.Conv2d.forward}
    def record(name: str):
        def hook(_module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # (N, C_in, H, W)
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    replaced = []
    for name, module in candidates.items():
        if name not in shapes or conv_kind(module, shapes[name]) is not None:
            continue  # not called, or already a plain or "SAME" convolution
        conv = effective_conv(module, shapes[name])
        if conv is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, conv)
            replaced.append(name)
    return model, replaced
