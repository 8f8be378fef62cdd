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

from subprune import validation
from subprune.hf.architectures import HEADS, find_transformer_sites, widths
from subprune.hf.architectures import prune_transformer_site_ as cut_site_
from subprune.saving import atomic_directory, check_destination, current_version, read_version
from subprune.surgery import get_module

WIDTHS_KEY = "subprune_widths"
REPORT_NAMES = ("report.json",)


def save_pruned(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                extra_json: dict[str, dict] | None = None) -> Path:
    """Write a (pruned) transformers model with ``save_pretrained`` and record its widths, atomically.

    Everything is written into a temporary sibling directory that then replaces
    ``directory`` as a whole, with the crash-safe protocol of
    :mod:`subprune.saving` (the same as :func:`subprune.save_pruned`): a
    failure, a kill or Ctrl-C leaves the previous save or the new one, complete.

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

    Raises
    ------
    TypeError
        ``model`` is not an nn.Module, ``directory`` not a path, ``extra_json`` not JSON-serialisable.
    ValueError, PermissionError, OSError
        The directory is a mount point, not writable, or its filesystem too full
        (:func:`subprune.saving.check_destination`); an ``extra_json`` name that is a path.
    subprune.saving.SaveInterrupted
        Ctrl-C: the message says whether the save was finished or rolled back.
    """
    model = validation.module("model", model)
    directory = validation.path("directory", directory).resolve()
    if extra_json is not None and not isinstance(extra_json, dict):
        raise TypeError(f"extra_json must be a dict of file name -> JSON object, got {type(extra_json).__name__}")
    texts = {}
    for name, obj in (extra_json or {}).items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"extra_json name {name!r} must be a plain file name inside the save, not a path")
        try:
            texts[name] = json.dumps(obj, indent=2) + "\n"
        except (TypeError, ValueError) as exc:
            raise TypeError(f"extra_json[{name!r}] cannot be written as JSON ({exc})") from exc
    record = widths(model)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_destination(directory, size)
    with atomic_directory(directory, expected_bytes=size) as tmp:
        model.save_pretrained(tmp)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config[WIDTHS_KEY] = record
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in texts.items():
            (tmp / name).write_text(text)
    return directory


def is_pruned_directory(directory: str | os.PathLike) -> bool:
    """True when ``directory/config.json`` carries the widths written by :func:`save_pruned`."""
    config_file = current_version(directory) / "config.json"
    try:
        return config_file.is_file() and WIDTHS_KEY in json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{Path(directory) / 'config.json'} is not valid JSON ({exc}): the save is damaged") from exc


def _check_widths(record, sites, config_file: Path) -> None:
    """The recorded widths of every block lie in 1..the widths that ``config.json`` builds."""
    if not isinstance(record, list) or len(record) != len(sites) // 2:
        count = len(record) if isinstance(record, list) else type(record).__name__
        raise ValueError(f"{config_file}: '{WIDTHS_KEY}' records {count} blocks, the model has {len(sites) // 2}: "
                         "the save is damaged")
    for site in sites:
        layer = record[site.layer]
        key = "kv_heads" if site.kind == HEADS else "ffn"
        value = layer.get(key) if isinstance(layer, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= site.channels:
            raise ValueError(f"{config_file}: block {site.layer} has {key}={value!r}; it must lie in "
                             f"1..{site.channels} (the width config.json gives): the save is damaged")


def _memory_bytes() -> float:
    """Physical memory of this machine (infinite where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _stored_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{file.name} cannot be read ({exc}): the save is damaged") from exc
    return shapes


def _add_saved_biases(model: nn.Module, stored_keys) -> None:
    """Give a consumer the bias the save holds for it (bias compensation added one to a bias-free Linear)."""
    for site in find_transformer_sites(model):
        module = get_module(model, site.consumer)
        key = f"{site.consumer}.bias"
        if key in stored_keys and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                   device=module.weight.device))


def _cut_query_heads(model: nn.Module, record) -> None:
    """Cut every key/value group to the recorded number of query heads (query-head units were pruned)."""
    for site in find_transformer_sites(model, units="qheads"):
        heads = record[site.layer]["heads"]
        if site.kind == HEADS and site.kv_groups and heads < site.channels:
            per_group, kept = site.channels // site.kv_groups, heads // site.kv_groups
            keep = torch.arange(site.kv_groups).unsqueeze(1) * per_group + torch.arange(kept)  # (kv_groups, kept)
            cut_site_(model, site, keep.reshape(-1))


def load_pruned(directory: str | os.PathLike, auto_class=None) -> nn.Module:
    """Reload a model written by :func:`save_pruned`, with its pruned shapes, in eval mode.

    One complete version is read even while another save replaces the
    directory (:func:`subprune.saving.read_version`). The recorded widths and
    the model that ``config.json`` describes are checked against the shapes
    stored in the safetensors headers on the meta device, before any weight is
    allocated.

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
        If the directory has no recorded widths, the widths lie outside the
        configured ones, or the stored weights do not match them.
    """
    import transformers
    from safetensors.torch import load_file

    directory = validation.path("directory", directory)
    if not is_pruned_directory(directory):
        raise ValueError(f"{directory}/config.json has no '{WIDTHS_KEY}': not written by subprune.hf.save_pruned; "
                         "use transformers' from_pretrained for unpruned models")
    auto_class = auto_class or transformers.AutoModel
    config_file = directory / "config.json"

    def build(config, record, device: str, stored_keys) -> nn.Module:
        with torch.device(device):
            model = auto_class.from_config(config)
        if device == "meta":  # the dense model is built before the widths cut it: within this machine's memory
            dense = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            if dense > _memory_bytes():
                raise ValueError(f"{config_file} describes a model of {dense / 2**30:,.1f} GB before pruning, more "
                                 f"than the {_memory_bytes() / 2**30:,.1f} GB of memory here: the save is damaged "
                                 "(or needs a larger machine)")
        sites = find_transformer_sites(model)
        _check_widths(record, sites, config_file)
        for site in sites:
            layer = record[site.layer]
            k = layer["kv_heads"] if site.kind == HEADS else layer["ffn"]
            if k < site.channels:
                cut_site_(model, site, torch.arange(k))
        _cut_query_heads(model, record)
        _add_saved_biases(model, stored_keys)
        return model

    def read(path: Path) -> nn.Module:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        record = getattr(config, WIDTHS_KEY)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors weights in {directory}")
        stored = _stored_shapes(files)
        shapes = {k: tuple(v.shape) for k, v in build(config, record, "meta", stored).state_dict().items()}
        wrong = sorted(k for k in stored.keys() & shapes.keys() if stored[k] != shapes[k])
        unexpected = sorted(stored.keys() - shapes.keys())
        if wrong or unexpected:
            details = [f"{k}: stored {list(stored[k])}, config gives {list(shapes[k])}" for k in wrong[:3]]
            raise ValueError(f"{directory}: the weights do not match config.json and its '{WIDTHS_KEY}' ("
                             + "; ".join(details + [f"unexpected {unexpected[:3]}"] * bool(unexpected))
                             + "): the save is damaged")
        model = build(config, record, "cpu", stored)
        state = {}
        for file in files:
            state.update(load_file(file))
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {id(params[name]) for name in state if name in params}
        really_missing = sorted(m for m in missing if m not in params or id(params[m]) not in loaded)  # tied: loaded
        if really_missing or unexpected:
            raise ValueError(f"weights do not match the recorded widths: missing {really_missing[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        return model.eval()

    return read_version(directory, read)
