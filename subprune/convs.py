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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
