"""Save and reload pruned models: safetensors weights plus the new module shapes.

A pruned model is the original architecture with some Linear, Conv2d and
BatchNorm modules rebuilt smaller. ``save_pruned`` writes

* ``model.safetensors``: the state dict;
* ``architecture.json``: the constructor arguments of every resizable module
  and the name of the base model in the registry (if it has one);
* any extra JSON files (the CLI's ``report.json``);

into a temporary folder beside the target and renames it into place, so a
failure leaves either the old folder or the new one, never a half-written one.
``load_pruned`` rebuilds the base architecture, resizes the modules and loads
the weights strictly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from subprune.surgery import RESIZABLE, build_module, get_module, module_config, set_module

FORMAT = "subprune-pruned-v1"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"
_SIZE_KEYS = frozenset({"in_features", "out_features", "in_channels", "out_channels", "num_features"})


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_permissions(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions a plain write would.

    ``tempfile`` creates private files (0600) and directories (0700); the
    published output should instead follow the user's umask, like any file.
    """
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for item in path.rglob("*"):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        _publish_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def architecture(model: nn.Module, base_model: str | None = None) -> dict:
    """The JSON description of ``model``'s resizable modules."""
    modules = {
        name: {"type": type(m).__name__, "config": module_config(m)}
        for name, m in model.named_modules()
        if type(m).__name__ in RESIZABLE
    }
    return {"format": FORMAT, "base_model": base_model, "model_class": type(model).__name__, "modules": modules}


REPORT_FILE = "report.json"
SAVED_FILES = frozenset({WEIGHTS_FILE, ARCHITECTURE_FILE, REPORT_FILE})


def check_target(directory: str | os.PathLike, overwrite: bool = False, extra_names: tuple[str, ...] = ()) -> Path:
    """Refuse a save target that would destroy something the user owns; return it resolved.

    A target may be new, an empty directory, or a previous save (holding only
    the files subprune writes). Anything else needs ``overwrite=True``.

    Raises
    ------
    FileExistsError
        The target or one of its parents is a file, or the target holds other files.
    ValueError
        The target is the current working directory or one of its parents.
    """
    target = Path(directory).resolve()
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
    return target


def save_pruned(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model: str | None = None,
    extra_json: dict[str, dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (pruned) model atomically to ``directory``.

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

    Returns
    -------
    Path of the directory.

    Raises
    ------
    FileExistsError, ValueError
        See :func:`check_target`; ValueError also for an ``extra_json`` name
        that is a path (not a plain file name) or one of the save's own files.
    """
    for name in extra_json or ():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"extra_json name {name!r} must be a plain file name inside the save, not a path")
        if name in (WEIGHTS_FILE, ARCHITECTURE_FILE):
            raise ValueError(f"extra_json name {name!r} would replace the save's own {name}; choose another name")
    target = check_target(directory, overwrite, tuple(extra_json or ()))
    with atomic_directory(target) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        write_json_atomic(tmp / ARCHITECTURE_FILE, architecture(model, base_model))
        for name, obj in (extra_json or {}).items():
            write_json_atomic(tmp / name, obj)
    return target


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of ``target``; on success it replaces ``target`` as a whole.

    The files written into the yielded directory get the permissions of a plain
    write (the umask). If the block raises (or is interrupted), the temporary
    directory is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _publish_permissions(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pruned(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Reload a model saved by :func:`save_pruned`.

    Parameters
    ----------
    directory : path
    model : nn.Module, optional
        An instance of the original (dense) architecture; it is copied, not
        modified. If omitted, the base model named in ``architecture.json`` is
        built from the registry in :mod:`subprune.models`.

    Returns
    -------
    nn.Module in eval mode, with the saved shapes and weights.

    Raises
    ------
    FileNotFoundError
        If the directory does not exist or lacks the saved files.
    ValueError
        If the files are not a subprune save, are damaged (unreadable JSON or
        weights, sizes larger than the dense model's, weights that do not fit
        the architecture; the message names the file), or no architecture is known.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a directory: pass the folder that "
                                "`subprune prune --out` or save_pruned wrote")
    for name in (WEIGHTS_FILE, ARCHITECTURE_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not a model saved by subprune")
    arch_file, weights_file = directory / ARCHITECTURE_FILE, directory / WEIGHTS_FILE
    try:
        spec = json.loads(arch_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{arch_file} is not valid JSON ({exc}): the save is damaged; prune the model again") from exc
    spec = spec if isinstance(spec, dict) else {}
    if spec.get("format") != FORMAT:
        raise ValueError(f"{arch_file} has format {spec.get('format')!r}, expected {FORMAT}")
    if not isinstance(spec.get("modules"), dict):
        raise ValueError(f"{arch_file} has no 'modules' mapping: the save is damaged; prune the model again")
    if model is None:
        if not spec.get("base_model"):
            raise ValueError("the save names no registered base model: pass an instance of the original model")
        from subprune.models import MODELS, get_spec

        if spec["base_model"] not in MODELS:
            raise ValueError(f"{arch_file} names base model {spec['base_model']!r}, which is not registered here "
                             f"({', '.join(MODELS)}); pass an instance of the original model")
        model = get_spec(spec["base_model"]).build()
    else:
        model = copy.deepcopy(model)
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{weights_file} cannot be read ({exc}): the save is damaged; prune the model again") from exc
    try:
        for name, entry in spec["modules"].items():
            current = get_module(model, name)
            if type(current).__name__ != entry["type"]:
                raise ValueError(f"module '{name}' is a {type(current).__name__}, the save has a {entry['type']}")
            dense = module_config(current)
            for key in _SIZE_KEYS.intersection(entry["config"]):
                value = entry["config"][key]
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dense[key]:
                    raise ValueError(f"module '{name}' has {key}={value!r}; a pruned size lies in 1..{dense[key]}")
            if dense != entry["config"]:
                set_module(model, name, build_module(entry["type"], entry["config"], like=current))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{arch_file} does not match the model or {WEIGHTS_FILE} ({type(exc).__name__}: "
                         f"{detail}): the save is damaged or was made from another model; prune it again") from exc
    return model.eval()
