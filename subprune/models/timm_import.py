"""Import timm on a machine without torchvision.

timm (every release tried, 0.9.16 to 1.0.31) imports torchvision at import time, but
its model definitions never call it: ``timm.layers`` imports
``torchvision.ops.misc.FrozenBatchNorm2d`` (for ``freeze_batch_norm_2d``) and
``timm.data`` imports torchvision's transforms and datasets (for its training
pipelines). torchvision only comes here as a 5.5 GB CUDA build, so when it is
absent :func:`import_timm` puts a placeholder package in ``sys.modules`` whose
every attribute is an inert class; building and running timm models needs
nothing of it. Any *use* of a placeholder (calling it) raises ImportError naming
torchvision. With torchvision installed, nothing is replaced.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

log = logging.getLogger(__name__)


class _Placeholder(type):
    """Metaclass of the placeholder classes: any attribute is another placeholder; calling one fails."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__name__} needs torchvision, which is not installed (timm was imported without it)")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torchvision`` and its submodules as placeholder packages."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def import_timm():
    """Return the ``timm`` module, with a torchvision placeholder if torchvision is not installed.

    Raises
    ------
    ImportError
        If timm is not installed (the message names the install command).
    """
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed: pip install --no-deps timm==1.0.31 pyyaml huggingface_hub")
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("torchvision") is None and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        log.info("torchvision is not installed: timm is imported with a placeholder for it")
        sys.meta_path.append(_StubFinder())
    return importlib.import_module("timm")
