"""Argument checks shared by the public entry points: numbers, flags, paths, models and tensors.

Numbers may be Python numbers, numpy scalars or one-element torch tensors (a
0-d ``torch.tensor(0.5)``); they are returned as plain ``float``/``int`` so
that configurations and reports hold JSON-serialisable values. Anything else
raises TypeError naming the parameter, the type and the value; a number out of
range raises ValueError naming the parameter, the value and the range.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_error(name: str, expected: str, value) -> TypeError:
    shown = "None" if value is None else f"{type(value).__name__} {_shown(value)}"
    return TypeError(f"{name} must be {expected}, got {shown}")


def _scalar(value):
    """The Python scalar of a numpy scalar / 0-d array or a one-element tensor; ``value`` otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_meta:
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def real(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (closed unless ``*_open``).

    Raises
    ------
    TypeError
        Not a real number (a string, a bool, a tensor of several elements, None).
    ValueError
        NaN, infinite (with ``finite``) or outside the interval.
    """
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise _type_error(name, "a number", value)
    number = float(number)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or (finite and math.isinf(number)) or below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={number!r} is out of range: it must be in {left}{low:g}, {high:g}{right}"
                         + (" and finite" if finite and math.isinf(high) else ""))
    return number


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (numpy integers and integer tensors included, floats refused).

    Raises
    ------
    TypeError
        Not an integer (a float such as 1.5 or 2.0, a string, a bool).
    ValueError
        Outside ``low..high``.
    """
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral):
        raise _type_error(name, "an integer", value)
    number = int(number)
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in {low}..{high}"
        raise ValueError(f"{name}={number} is out of range: it must be {bounds}")
    return number


def flag(name: str, value) -> bool:
    """``value`` as a bool (numpy bools included; 0/1 and strings refused)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        raise _type_error(name, "True or False", value)
    return value


def choice(name: str, value, choices) -> str:
    """``value``, a string among ``choices``."""
    if not isinstance(value, str):
        raise _type_error(name, f"a string (one of {', '.join(choices)})", value)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {', '.join(choices)}")
    return value


def path(name: str, value) -> Path:
    """``value`` (a str or os.PathLike, not empty) as a Path."""
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise _type_error(name, "a path (a non-empty str or os.PathLike)", value)
    return Path(value)


def device(name: str, value) -> torch.device | None:
    """``value`` (None, a device name or a torch.device) as a torch.device or None."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise _type_error(name, 'a device name ("cpu", "cuda:0") or a torch.device', value)
    try:
        return torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{name}={value!r} is not a torch device name (e.g. 'cpu', 'cuda', 'cuda:1')") from exc


def module(name: str, value) -> nn.Module:
    """``value``, a torch.nn.Module whose parameters and buffers hold values (not on the meta device).

    Raises
    ------
    TypeError
        Not an nn.Module.
    ValueError
        Some parameter or buffer is on the meta device (shapes without values).
    """
    if not isinstance(value, nn.Module):
        raise _type_error(name, "a torch.nn.Module", value)
    meta = [n for n, t in [*value.named_parameters(), *value.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{name} has {len(meta)} parameters/buffers on the meta device (shapes without values, "
                         f"e.g. '{meta[0]}'): load its weights first, e.g. model.to_empty(device='cpu') then "
                         "load_state_dict, or from_pretrained without device_map='meta'")
    return value


def tensor(name: str, value) -> Tensor:
    """``value``, a torch Tensor with values (not on the meta device)."""
    if not isinstance(value, Tensor):
        raise _type_error(name, "a torch.Tensor", value)
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without values): pass real input tensors")
    return value


def interpolation_advice(ridge: float) -> str:
    """What to do when a refit has fewer calibration rows than twice its columns (no ridge suggested if one is set)."""
    if ridge > 0:
        return (f"use more samples, or a larger ridge than the {ridge:g} set (PruneConfig(ridge={10 * ridge:g}), "
                f"CLI --ridge {10 * ridge:g})")
    return "use more samples or a ridge (PruneConfig(ridge=0.1), CLI --ridge 0.1)"
