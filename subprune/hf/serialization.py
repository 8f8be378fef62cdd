"""Save and reload pruned transformers with ``save_pretrained``-compatible files.

:func:`save_pruned` writes the usual ``config.json`` + ``model.safetensors`` (and
the tokenizer when given) through ``save_pretrained``; ``config.json`` gains one
key, ``subprune_widths``: per block the number of query heads, key/value heads
and FFN neurons left. :func:`load_pruned` rebuilds the model from the config,
shrinks every block to those widths (non-uniform heads and FFN widths
included) and loads the weights strictly. Plain ``from_pretrained`` cannot do
this, since a config holds one intermediate_size and one head count.

    >>> save_pruned(result.model, "pruned/", tokenizer)
    >>> model = load_pruned("pruned/")            # AutoModel
    >>> model = load_pruned("pruned/", AutoModelForCausalLM)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from subprune.hf.architectures import HEADS, find_transformer_sites, widths
from subprune.hf.architectures import prune_transformer_site_ as cut_site_
from subprune.serialization import atomic_directory, write_json_atomic

WIDTHS_KEY = "subprune_widths"


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                extra_json: dict[str, dict] | None = None) -> Path:
    """Write a (pruned) transformers model with ``save_pretrained`` and record its widths, atomically.

    Everything is written into a temporary sibling directory that then replaces
    ``directory`` as a whole (:func:`subprune.serialization.atomic_directory`):
    a failure or an interruption leaves no half-written output.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Not modified (the widths are written into config.json after saving).
    directory : path-like
    tokenizer : optional
        Saved next to the model when given.
    extra_json : dict file name -> object, optional
        More JSON files written in the same atomic step (e.g. ``report.json``).

    Returns
    -------
    Path
        The directory.
    """
    directory = Path(directory).resolve()
    record = widths(model)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config[WIDTHS_KEY] = record
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            write_json_atomic(tmp / name, obj)
    return directory


def is_pruned_directory(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` carries the widths written by :func:`save_pruned`."""
    config_file = Path(directory) / "config.json"
    return config_file.is_file() and WIDTHS_KEY in json.loads(config_file.read_text())


def load_pruned(directory: str | os.PathLike, auto_class=None) -> nn.Module:
    """Reload a model written by :func:`save_pruned`, with its pruned shapes, in eval mode.

    Parameters
    ----------
    directory : path-like
    auto_class : transformers auto class, optional
        ``AutoModel`` (default) or e.g. ``AutoModelForCausalLM``; must match the
        class that was saved.

    Returns
    -------
    transformers PreTrainedModel

    Raises
    ------
    ValueError
        If the directory has no recorded widths, or the weights do not match them.
    """
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_pruned_directory(directory):
        raise ValueError(f"{directory}/config.json has no '{WIDTHS_KEY}': not written by subprune.hf.save_pruned; "
                         "use transformers' from_pretrained for unpruned models")
    auto_class = auto_class or transformers.AutoModel
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    record = getattr(config, WIDTHS_KEY)
    model = auto_class.from_config(config)
    sites = find_transformer_sites(model)
    if len(sites) != 2 * len(record):
        raise ValueError(f"{len(record)} blocks recorded, the model has {len(sites) // 2}")
    for site in sites:
        layer = record[site.layer]
        k = layer["kv_heads"] if site.kind == HEADS else layer["ffn"]
        if k < site.channels:
            cut_site_(model, site, torch.arange(k))
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise ValueError(f"no *.safetensors weights in {directory}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in state if name in params}
    really_missing = sorted(m for m in missing if m not in params or id(params[m]) not in loaded)  # tied: loaded
    if really_missing or unexpected:
        raise ValueError(f"weights do not match the recorded widths: missing {really_missing[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()
