"""Save and reload pruned models: safetensors weights plus the new module shapes.

A pruned model is the original architecture with some Linear, Conv2d and
BatchNorm modules rebuilt smaller. ``save_pruned`` writes

* ``model.safetensors``: the state dict;
* ``architecture.json``: the constructor arguments of every resizable module,
  the name of the base model in the registry (if it has one) or the ``source``
  that rebuilds the dense model (a factory, timm or torchvision name:
  :class:`subprune.models.sources.ModelSource`), and the names of the frozen
  (``requires_grad=False``) parameters;
* any extra JSON files (the CLI's ``report.json``);

into a temporary folder beside the target and swaps it into place with the
crash-safe protocol of :mod:`subprune.saving` (also used by the transformers
save), so a failure, a kill or Ctrl-C leaves either the old save or the new one,
never a half-written one. ``load_pruned`` reads one complete version, checks
every module of ``architecture.json`` against the dense model before building
anything, rebuilds the base architecture, resizes the modules and loads the
weights strictly, in the dtypes they were saved in. See ``docs/saving.md``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load, save
from torch import nn

from subprune import validation
from subprune.attention import HEAD_ATTRIBUTES
from subprune.saving import atomic_directory, check_destination, current_version, publish_permissions, read_version
from subprune.surgery import RESIZABLE, build_module, get_module, module_config, set_module

__all__ = ["atomic_directory", "check_target", "load_pruned", "save_pruned", "write_json_atomic"]

FORMAT = "subprune-pruned-v1"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
_SIZE_KEYS = frozenset({"in_features", "out_features", "in_channels", "out_channels", "num_features"})
_PRUNED_KEYS = _SIZE_KEYS | {"groups", "front", "back"}  # what pruning may change; every other key stays dense


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to the single file ``path``: a temporary file, fsync, then ``os.replace``."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as saved: parameter and buffer counts x dtype sizes."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def architecture(model: nn.Module, base_model: str | None = None, source: dict | None = None) -> dict:
    """The JSON description of ``model``'s resizable modules, how to rebuild it, and its frozen parameters.

    Linear, Conv2d, BatchNorm and ZeroPadShortcut modules are described by their
    constructor arguments (``modules``); every other module that owns tensors
    (a subclass such as timm's Conv2dSame, a LayerNorm or LayerScale whose
    parameters a site sliced) by the shapes of its own tensors and its integer
    size attributes (``tensors``).
    """
    modules, tensors = {}, {}
    for name, m in model.named_modules():
        if RESIZABLE.get(type(m).__name__) is type(m):
            modules[name] = {"type": type(m).__name__, "config": module_config(m)}
            continue
        own = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
        lists = {k: list(v) for k, v in vars(m).items()
                 if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)}
        if own or lists or any(isinstance(getattr(m, k, None), int) for k in HEAD_ATTRIBUTES):
            tensors[name] = {
                "type": type(m).__name__,
                "shapes": {k: list(t.shape) for k, t in own.items()},
                "attributes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items()
                               if k in _SIZE_ATTRIBUTES and isinstance(v, (int, tuple)) and not isinstance(v, bool)},
                "lists": lists,
            }
    out = {"format": FORMAT, "base_model": base_model, "model_class": type(model).__name__, "modules": modules,
           "tensors": tensors}
    if source is not None:
        out["source"] = source
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        out["frozen"] = frozen
    return out


_SIZE_ATTRIBUTES = frozenset({"in_features", "out_features", "in_channels", "out_channels", "num_features",
                              "num_channels", "num_groups", "normalized_shape", "groups", *HEAD_ATTRIBUTES})


def _resize_tensors(module: nn.Module, entry: dict) -> None:
    """Give ``module`` empty tensors of the saved shapes and the saved size attributes (weights are loaded next)."""
    for key, shape in entry["shapes"].items():
        current = getattr(module, key)
        if list(current.shape) == shape:
            continue
        empty = current.new_empty(shape)
        if key in module._parameters:
            module._parameters[key] = nn.Parameter(empty, requires_grad=current.requires_grad)
        else:
            module._buffers[key] = empty
    for key, value in entry.get("attributes", {}).items():
        setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for key, value in entry.get("lists", {}).items():  # split sizes and other size lists
        setattr(module, key, list(value))


REPORT_FILE = "report.json"
SAVED_FILES = frozenset({WEIGHTS_FILE, ARCHITECTURE_FILE, REPORT_FILE})


def check_target(directory: str | os.PathLike, overwrite: bool = False, extra_names: tuple[str, ...] = (),
                 expected_bytes: int | None = None) -> Path:
    """Refuse a save target that would destroy something the user owns or cannot be written; return it resolved.

    A target may be new, an empty directory, or a previous save (holding only
    the files subprune writes). Anything else needs ``overwrite=True``. The
    target must also be writable and not a mount point, and, given
    ``expected_bytes``, its filesystem must have that much space free
    (:func:`subprune.saving.check_destination`). Run before any work.

    Raises
    ------
    FileExistsError
        The target or one of its parents is a file, or the target holds other files.
    ValueError
        The target is the current working directory or one of its parents, or a mount point.
    PermissionError, OSError
        The target's directory is not writable, or has too little free space.
    """
    directory = validation.path("directory", directory)
    overwrite = validation.flag("overwrite", overwrite)
    target = directory.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"cannot save into {directory}: it is (or contains) the current directory; name a new folder")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise FileExistsError(f"cannot save into {directory}: {parent} is a file, not a directory")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory; choose another path")
        contents = {p.name for p in target.iterdir()}
        foreign = sorted(contents - SAVED_FILES - set(extra_names))
        if contents and (foreign or ARCHITECTURE_FILE not in contents) and not overwrite:
            listed = ", ".join(foreign or sorted(contents))
            raise FileExistsError(
                f"{directory} holds files not written by subprune ({listed}); choose another directory, "
                "or pass overwrite=True (CLI: --overwrite) to replace it as a whole"
            )
    check_destination(target, expected_bytes)
    return target


def _json_texts(extra_json, spec: dict) -> dict[str, str]:
    """Every JSON file of the save, serialised before anything is written (a bad object fails first)."""
    if extra_json is not None and not isinstance(extra_json, dict):
        raise TypeError(f"extra_json must be a dict of file name -> JSON object, got {type(extra_json).__name__}")
    for name in extra_json or ():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"extra_json name {name!r} must be a plain file name inside the save, not a path")
        if name in (WEIGHTS_FILE, ARCHITECTURE_FILE):
            raise ValueError(f"extra_json name {name!r} would replace the save's own {name}; choose another name")
    texts = {}
    for name, obj in {ARCHITECTURE_FILE: spec, **(extra_json or {})}.items():
        try:
            texts[name] = json.dumps(obj, indent=2, allow_nan=True) + "\n"
        except (TypeError, ValueError) as exc:
            raise TypeError(f"extra_json[{name!r}] cannot be written as JSON ({exc})") from exc
    return texts


def save_pruned(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model: str | None = None,
    extra_json: dict[str, dict] | None = None,
    overwrite: bool = False,
    source=None,
) -> Path:
    """Save a (pruned) model atomically to ``directory``.

    The files are written into a temporary sibling, fsync-ed and swapped into
    place (:func:`subprune.saving.atomic_directory`): after a crash, a kill or
    Ctrl-C, ``directory`` holds the previous save or the new one, complete.

    Parameters
    ----------
    model : nn.Module
    directory : path
        Created (with parents) or replaced as a whole.
    base_model : str, optional
        Registry name of the original architecture (see :mod:`subprune.models`),
        so that :func:`load_pruned` can rebuild it without being handed a model.
    extra_json : dict file name -> object, optional
        More JSON files to write in the same atomic step (e.g. ``report.json``).
    overwrite : bool, default False
        Replace a directory that holds files subprune did not write. Without it,
        only a new path, an empty directory or a previous save is replaced.
    source : ModelSource, its record (dict), or a ``--model`` text (``"file.py:factory"``), optional
        How to rebuild the dense model when it is not registered (a factory,
        timm or torchvision name: :class:`subprune.models.sources.ModelSource`),
        so that :func:`load_pruned` needs no model instance.

    Returns
    -------
    Path of the directory.

    Raises
    ------
    TypeError
        ``model`` is not an nn.Module, ``directory`` not a path, an object of
        ``extra_json`` not JSON-serialisable.
    FileExistsError, ValueError, PermissionError, OSError
        See :func:`check_target`; ValueError also for an ``extra_json`` name
        that is a path (not a plain file name) or one of the save's own files.
    subprune.saving.SaveInterrupted
        Ctrl-C: the message and ``.saved`` say whether the save was finished or rolled back.
    """
    model = validation.module("model", model)
    if base_model is not None and not isinstance(base_model, str):
        raise TypeError(f"base_model must be a registered model name (str) or None, got {type(base_model).__name__}")
    if isinstance(source, str):  # a --model text such as "my_nets.py:build"
        from subprune.models.sources import parse_model

        source = parse_model(source)
    record = source.record() if hasattr(source, "record") else source
    texts = _json_texts(extra_json, architecture(model, base_model, record))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    target = check_target(directory, overwrite, tuple(extra_json or ()), expected_bytes=size)
    weights = save(state, metadata={"format": FORMAT})
    with atomic_directory(target, expected_bytes=size) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(weights)
        for name, text in texts.items():
            (tmp / name).write_text(text)
    return target


def _check_entry_type(where: str, entry: dict, current: nn.Module) -> None:
    """The saved module type is the model's, or ValueError naming both."""
    if type(current).__name__ != entry.get("type"):
        raise ValueError(f"{where} is a {type(current).__name__} in the model, the save has a {entry.get('type')!r}: "
                         "the save was made from another model")


def _check_module_entry(name: str, entry, current: nn.Module, arch_file: Path) -> dict | None:
    """The saved config of module ``name`` checked against its dense version; None when it is the dense one.

    Pruning changes only sizes (at most the dense ones, at least 1), the groups
    of a grouped conv and the zero channels of a shortcut; kernel, stride,
    padding, dilation, eps, momentum and flags stay those of the dense model.
    Checked before any module is built, so a damaged file cannot make the
    loader allocate more than the dense model.
    """
    where = f"{arch_file}: module '{name}'"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ValueError(f"{where} has no 'config' mapping: the save is damaged; prune the model again")
    _check_entry_type(where, entry, current)
    config, dense = entry["config"], module_config(current)
    if set(config) != set(dense):
        extra, missing = sorted(set(config) - set(dense)), sorted(set(dense) - set(config))
        raise ValueError(f"{where} has keys {extra} it should not have and lacks {missing}: the save is damaged")
    for key, value in config.items():
        if key in _PRUNED_KEYS:
            low = 0 if key in ("front", "back") else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= dense[key]:
                raise ValueError(f"{where} has {key}={value!r}; a pruned {key} is an integer in {low}..{dense[key]} "
                                 "(the dense model's): the save is damaged or was made from another model")
        elif value != dense[key] or type(value) is not type(dense[key]):
            raise ValueError(f"{where} has {key}={value!r}, the dense model {dense[key]!r}; pruning never changes "
                             f"{key}: the save is damaged or was made from another model")
    groups = config.get("groups")
    if groups is not None and (config["in_channels"] % groups or config["out_channels"] % groups):
        raise ValueError(f"{where} has groups={groups}, which does not divide in_channels={config['in_channels']} "
                         f"and out_channels={config['out_channels']}: the save is damaged")
    return None if config == dense else config


def _check_tensor_entry(name: str, entry, current: nn.Module, arch_file: Path) -> None:
    """The saved tensor shapes and size attributes of module ``name`` are at most its dense ones (before allocating)."""
    where = f"{arch_file}: module '{name}'"
    if not isinstance(entry, dict) or not isinstance(entry.get("shapes"), dict):
        raise ValueError(f"{where} has no 'shapes' mapping: the save is damaged; prune the model again")
    _check_entry_type(where, entry, current)
    own = {**dict(current.named_parameters(recurse=False)), **dict(current.named_buffers(recurse=False))}
    for key, shape in entry["shapes"].items():
        if key not in own:
            raise ValueError(f"{where} has no tensor '{key}' in the model: the save was made from another model")
        dense = list(own[key].shape)
        if (not isinstance(shape, list) or len(shape) != len(dense)
                or not all(isinstance(s, int) and not isinstance(s, bool) and min(1, d) <= s <= d
                           for s, d in zip(shape, dense, strict=True))):
            raise ValueError(f"{where} has {key} of shape {shape!r}; a pruned shape has {len(dense)} sizes, each in "
                             f"1..{dense} (the dense model's): the save is damaged or was made from another model")
    attributes = entry.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValueError(f"{where} has 'attributes' that are not a mapping: the save is damaged")
    for key, value in attributes.items():
        dense = getattr(current, key, None)
        dense = list(dense) if isinstance(dense, tuple) else dense
        values, limits = (value, dense) if isinstance(value, list) else ([value], [dense])
        if (type(value) is not type(dense) or not isinstance(limits, list) or len(values) != len(limits)
                or not all(isinstance(v, int) and not isinstance(v, bool) and isinstance(d, int) and 1 <= v <= d
                           for v, d in zip(values, limits, strict=True))):
            raise ValueError(f"{where} has {key}={value!r}; a pruned {key} is an integer in 1..{dense!r} "
                             "(the dense model's): the save is damaged or was made from another model")


def load_pruned(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Reload a model saved by :func:`save_pruned`.

    One complete version is read even while another save replaces the
    directory, and a save left half-swapped by a crash is completed first
    (:func:`subprune.saving.read_version`).

    Parameters
    ----------
    directory : path
    model : nn.Module, optional
        An instance of the original (dense) architecture; it is copied, not
        modified. If omitted, the base model named in ``architecture.json`` is
        built from the registry in :mod:`subprune.models`, or from the recorded
        ``source`` (factory, timm or torchvision name).

    Returns
    -------
    nn.Module in eval mode, with the saved shapes, weights and dtypes; the
    parameters frozen when saved have ``requires_grad=False``.

    Raises
    ------
    TypeError
        ``directory`` is not a path or ``model`` not an nn.Module.
    FileNotFoundError
        If the directory does not exist or lacks the saved files.
    ValueError
        If the files are not a subprune save, are damaged (unreadable JSON or
        weights, sizes larger than the dense model's, kernel, stride, padding,
        groups or eps other than the dense model's, weights that do not fit the
        architecture; the message names the file), or no architecture is known.
    """
    directory = validation.path("directory", directory)
    if model is not None:
        model = validation.module("model", model)
    if not current_version(directory).is_dir():  # (mid-swap, the directory itself is briefly absent)
        raise FileNotFoundError(f"{directory} does not exist or is not a directory: pass the folder that "
                                "`subprune prune --out` or save_pruned wrote")

    def read(path: Path) -> tuple[dict, bytes]:
        for name in (WEIGHTS_FILE, ARCHITECTURE_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a model saved by subprune")
        return (path / ARCHITECTURE_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()

    arch_bytes, weights = read_version(directory, read)
    arch_file, weights_file = directory / ARCHITECTURE_FILE, directory / WEIGHTS_FILE
    try:
        spec = json.loads(arch_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{arch_file} is not valid JSON ({exc}): the save is damaged; prune the model again") from exc
    spec = spec if isinstance(spec, dict) else {}
    if spec.get("format") != FORMAT:
        raise ValueError(f"{arch_file} has format {spec.get('format')!r}, expected {FORMAT}")
    if not isinstance(spec.get("modules"), dict):
        raise ValueError(f"{arch_file} has no 'modules' mapping: the save is damaged; prune the model again")
    if model is None and spec.get("source") and not spec.get("base_model"):
        from subprune.models.sources import ModelSource

        model = ModelSource.from_record(spec["source"]).build()
    elif model is None:
        if not spec.get("base_model"):
            raise ValueError("the save names no registered base model and no source to rebuild it: pass an "
                             "instance of the original model (load_pruned(DIR, model=MyModel()))")
        from subprune.models import MODELS, get_spec

        if not isinstance(spec["base_model"], str) or spec["base_model"] not in MODELS:
            raise ValueError(f"{arch_file} names base model {spec['base_model']!r}, which is not registered here "
                             f"({', '.join(MODELS)}); pass an instance of the original model")
        model = get_spec(spec["base_model"]).build()
    else:
        model = copy.deepcopy(model)
    changes = {}
    for name, entry in spec["modules"].items():  # every module checked before any is built
        try:
            current = get_module(model, name)
        except ValueError as exc:
            raise ValueError(f"{arch_file}: {exc}: the save was made from another model") from None
        config = _check_module_entry(name, entry, current, arch_file)
        if config is not None:
            changes[name] = (entry["type"], config, current)
    resized = spec.get("tensors", {})
    if not isinstance(resized, dict):
        raise ValueError(f"{arch_file} has a 'tensors' entry that is not a mapping: the save is damaged")
    for name, entry in resized.items():
        try:
            current = get_module(model, name)
        except ValueError as exc:
            raise ValueError(f"{arch_file}: {exc}: the save was made from another model") from None
        _check_tensor_entry(name, entry, current, arch_file)
    try:
        state = load(weights)
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{weights_file} cannot be read ({exc}): the save is damaged; prune the model again") from exc
    try:
        for name, (type_name, config, current) in changes.items():
            set_module(model, name, build_module(type_name, config, like=current))
        for name, entry in spec.get("tensors", {}).items():
            current = get_module(model, name)
            if type(current).__name__ != entry["type"]:
                raise ValueError(f"module '{name}' is a {type(current).__name__}, the save has a {entry['type']}")
            _resize_tensors(current, entry)
        from subprune.models.sources import adopt_dtypes

        adopt_dtypes(model, state)
        model.load_state_dict(state, strict=True)
        frozen = set(spec.get("frozen") or ())
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{arch_file} does not match the model or {WEIGHTS_FILE} ({type(exc).__name__}: "
                         f"{detail}): the save is damaged or was made from another model; prune it again") from exc
    return model.eval()
