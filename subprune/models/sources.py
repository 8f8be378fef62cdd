"""Any model from the command line: how to build it, load its weights, and rebuild it later.

``--model`` takes

* a registered name (``lenet``, ...: :data:`subprune.models.MODELS`);
* ``timm:NAME`` (``timm.create_model(NAME, pretrained=False, **kwargs)``, when
  timm is installed) or ``torchvision:NAME`` (``torchvision.models.get_model``,
  when torchvision is installed);
* ``module.path:factory`` or ``path/to/file.py:factory``: a function (or class)
  that returns the ``nn.Module``, called with ``--model-kwargs`` (JSON);

and ``--weights FILE`` loads a state dict into it (``.safetensors``, or a
``torch.save`` file read with ``torch.load(weights_only=True)``; a checkpoint
dict holding ``state_dict``/``model`` and a ``module.`` prefix from
DataParallel are unwrapped). ``hf:PATH`` models are handled by
:mod:`subprune.hf`. A :class:`ModelSource` is recorded in the save's
``architecture.json`` (:func:`subprune.serialization.save_pruned`), so
``load_pruned`` and ``subprune evaluate`` rebuild the dense architecture
without being handed a model (the repository's docs/own-model.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["KINDS", "ModelSource", "adopt_dtypes", "load_state_file", "parse_model"]

log = logging.getLogger(__name__)

KINDS = ("registered", "timm", "torchvision", "factory")
FORMS = ("a registered name (see `subprune list`), hf:PATH, timm:NAME, torchvision:NAME, "
         "module.path:factory or file.py:factory")


@dataclass(frozen=True)
class ModelSource:
    """Where a dense model comes from.

    Attributes
    ----------
    kind : {"registered", "timm", "torchvision", "factory"}
    target : str
        The registered or timm/torchvision name, or ``module.path:factory`` /
        ``/absolute/file.py:factory``.
    kwargs : dict
        Keyword arguments of the factory (JSON values).
    weights : str or None
        Absolute path of the weights file given with ``--weights``.
    """

    kind: str
    target: str
    kwargs: dict = field(default_factory=dict)
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model source kind {self.kind!r} is unknown; one of {', '.join(KINDS)}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"model kwargs must be a JSON object, got {self.kwargs!r}")

    @property
    def name(self) -> str:
        """The ``--model`` text that gives this source."""
        return self.target if self.kind in ("registered", "factory") else f"{self.kind}:{self.target}"

    def build(self) -> nn.Module:
        """The architecture with fresh weights (what ``load_pruned`` resizes and fills).

        Raises
        ------
        ImportError
            timm/torchvision missing, or the factory's module cannot be imported.
        ValueError
            Unknown name, or the factory does not return an ``nn.Module``.
        """
        if self.kind == "registered":
            from subprune.models import get_spec

            return get_spec(self.target).build()
        if self.kind == "timm":
            timm = import_timm()
            if self.target not in timm.list_models():
                close = timm.list_models(f"*{self.target}*")[:8]
                raise ValueError(f"timm has no model {self.target!r}" + (f"; close names: {', '.join(close)}"
                                                                          if close else ""))
            return timm.create_model(self.target, pretrained=False, **self.kwargs)
        if self.kind == "torchvision":
            _require("torchvision", "pip install torchvision (a large CUDA build here; install it only if needed)")
            import torchvision.models

            try:
                return torchvision.models.get_model(self.target, weights=None, **self.kwargs)
            except ValueError as exc:
                raise ValueError(f"torchvision has no model {self.target!r} ({exc}); see "
                                 "torchvision.models.list_models()") from exc
        factory = _factory(self.target)
        try:
            model = factory(**self.kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.target}(**{self.kwargs}) failed ({exc}): pass the factory's arguments with "
                            "--model-kwargs '{\"name\": value}'") from exc
        if not isinstance(model, nn.Module):
            raise ValueError(f"{self.target} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def load(self) -> nn.Module:
        """The dense model with its weights, in eval mode.

        Registered models get their pretrained weights; the others the
        ``weights`` file when one is given (a warning otherwise: timm and
        torchvision cannot download pretrained weights offline).

        Raises
        ------
        FileNotFoundError, ValueError
            See :func:`load_state_file`; ValueError also names missing or
            unexpected keys when the weights do not fit the architecture.
        """
        if self.kind == "registered" and self.weights is None:
            from subprune.models import load_model

            return load_model(self.target)
        model = self.build()
        if self.weights is None:
            log.warning("%s: no --weights given, so the model keeps its random initialisation", self.name)
            return model.eval()
        state = load_state_file(self.weights)
        adopt_dtypes(model, state)
        hint = ("; the factory may need other arguments (--model-kwargs, e.g. '{\"num_classes\": 10}')"
                if self.kind != "registered" else "")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            sizes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line][:3]
            raise ValueError(f"--weights {self.weights} does not fit {self.name}: {'; '.join(sizes) or exc}"
                             f"{hint}") from exc
        if missing or unexpected:
            raise ValueError(f"--weights {self.weights} does not fit {self.name}: missing keys {missing[:5]}, "
                             f"unexpected keys {unexpected[:5]}{hint}")
        return model.eval()

    def record(self) -> dict:
        """JSON description, stored in architecture.json as ``source``."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> ModelSource:
        """Inverse of :meth:`record`.

        Raises
        ------
        ValueError
            If ``record`` is not such a description.
        """
        if not isinstance(record, dict) or not isinstance(record.get("target"), str):
            raise ValueError(f"model source {record!r} is not a subprune model source")
        return cls(record.get("kind", ""), record["target"], record.get("kwargs") or {}, record.get("weights"))


def import_timm():
    """The timm module (with issue 15's torchvision placeholder where that module exists).

    Raises
    ------
    ImportError
        timm is not installed, or does not import; the message names the install.
    """
    try:
        from subprune.models.timm_import import import_timm as imported
    except ImportError:
        return _require("timm", "pip install --no-deps timm==1.0.31 (or `make zoo-extras`)")
    return imported()


def _require(module: str, install: str):
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed: {install}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is installed but does not import ({exc}): {install}") from exc


def _factory(target: str):
    """The callable named by ``module.path:factory`` or ``file.py:factory``."""
    location, _, attribute = target.rpartition(":")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: --model FILE.py:factory needs the Python file "
                                    "that defines the model")
        name = f"subprune_user_model_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        cwd = str(Path.cwd())
        if cwd not in sys.path:  # `subprune` is a console script: the current directory is not on sys.path
            sys.path.append(cwd)
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as exc:
            raise ImportError(f"cannot import {location!r} ({exc}): give an importable module (on PYTHONPATH or in "
                              "the current directory) or a file path ending in .py") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(f"{location} has no callable {attribute!r}; it defines {', '.join(names[:12]) or 'none'}")
    return factory


def parse_model(text: str, weights: str | None = None, kwargs: str | dict | None = None) -> ModelSource:
    """The :class:`ModelSource` of a ``--model`` value (not ``hf:PATH``).

    Parameters
    ----------
    text : str
        See the module docstring.
    weights : str, optional
        Path of a weights file (made absolute).
    kwargs : str (JSON) or dict, optional
        Factory keyword arguments.

    Raises
    ------
    ValueError
        If ``text`` has none of the forms, or ``kwargs`` is not a JSON object.
    """
    from subprune.models import MODELS

    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs {kwargs!r} is not JSON ({exc}); e.g. '{{\"num_classes\": 10}}'") from exc
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object such as '{{\"num_classes\": 10}}', got {kwargs!r}")
    weights = None if weights is None else str(Path(weights).resolve())
    if text in MODELS:
        if kwargs:
            raise ValueError(f"--model-kwargs does not apply to the registered model {text}")
        return ModelSource("registered", text, {}, weights)
    for kind in ("timm", "torchvision"):
        if text.startswith(f"{kind}:") and len(text) > len(kind) + 1:
            return ModelSource(kind, text[len(kind) + 1 :], kwargs, weights)
    location, sep, attribute = text.rpartition(":")
    if sep and location and attribute.isidentifier():
        if location.endswith(".py"):
            location = str(Path(location).resolve())
        return ModelSource("factory", f"{location}:{attribute}", kwargs, weights)
    raise ValueError(f"--model {text!r} is not understood: give {FORMS}")


def load_state_file(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A checkpoint dict that holds the state dict under ``state_dict``, ``model``
    or ``model_state_dict`` is unwrapped, and a ``module.`` prefix on every key
    (DataParallel) is removed.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it cannot be read or holds no tensors.
    """
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--weights {path} is a directory, not a weights file: pass the .pt, .pth or .safetensors "
                         "file inside it")
    if not file.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message runs to many lines and suggests weights_only=False (arbitrary code): one line instead
        if "Weights only load failed" in str(exc):
            why = "it holds pickled Python objects a safe load refuses (a whole pickled model?) or it is damaged"
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            why = f"it is damaged or not a weights file ({type(exc).__name__}: {first})"
        raise ValueError(f"--weights {path} cannot be read as safetensors or a torch state dict: {why}; save it with "
                         "torch.save(model.state_dict(), PATH) or safetensors.torch.save_file") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--weights {path} holds no state dict of tensors; save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def adopt_dtypes(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give ``model``'s parameters and buffers the floating dtypes of ``state`` before loading it.

    ``load_state_dict`` copies into the existing tensors, so a float64
    checkpoint loaded into a float32 model would come back float32; this keeps
    the saved dtype. Modifies ``model`` in place.
    """
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, tensor in tensors.items():
            saved = state.get(name)
            if saved is not None and saved.is_floating_point() and tensor.is_floating_point() and (
                    saved.dtype != tensor.dtype):
                tensor.data = tensor.data.to(saved.dtype)
