"""Calibration data from files: image folders, tensor files, text files, ``datasets`` directories.

:func:`load_inputs` reads what ``subprune prune --data PATH`` is given:

* a folder of images (``.png``, ``.jpg``, ...; read with Pillow): with class
  sub-folders (``root/cat/1.png``) the sorted folder names give the labels, a
  flat folder has none. Each image is resized (``resize``: the short side to
  the size / ``crop_pct``, then a centre crop, as timm's evaluation
  transform), scaled to [0, 1] and normalised with ``mean``/``std``. The
  settings come from :class:`ImageSettings`; for timm models,
  :func:`timm_settings` reads the model's own (``timm.data.resolve_data_config``);
* ``.npy`` (one array), ``.pt``/``.pth`` (a Tensor, a tuple ``(inputs, labels)``
  or a dict) or ``.safetensors`` (a dict of tensors): a dict with one input is
  that input, several are passed as ``model(**inputs)``; the keys
  ``label``/``labels``/``y``/``targets`` are the labels and ``x``/``inputs`` the input;
* a Hugging Face ``datasets`` directory (``save_to_disk``; read with
  ``datasets.load_from_disk``, when installed): an ``image``/``img`` column is
  treated as the image folder's images, numeric columns as inputs, ``label``/
  ``labels`` as labels, a ``text`` column as texts;
* ``.txt`` (one passage per non-empty line) or ``.jsonl`` (a ``"text"`` field per
  line): texts, for ``hf:`` models (:func:`load_texts`).

Labels are optional everywhere; only the methods that need them use them.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "ImageSettings", "LoadedData", "load_inputs", "load_texts", "timm_settings"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl")
LABEL_KEYS = ("label", "labels", "y", "targets", "target")
INPUT_KEYS = ("x", "inputs", "input", "images", "pixel_values")
FORMS = ("a folder of images (class sub-folders optional), a .npy/.pt/.safetensors tensor file, a .txt/.jsonl "
         "text file (hf: models), or a Hugging Face datasets directory (save_to_disk)")


@dataclass(frozen=True)
class ImageSettings:
    """How images become model inputs.

    Attributes
    ----------
    size : tuple (height, width) or None
        Output size; None keeps the images' own size (they must then all agree).
    crop_pct : float
        The short side is resized to ``size / crop_pct`` before the centre crop
        (1.0: resize straight to ``size``' short side).
    mean, std : tuple of float or None
        Per-channel normalisation after scaling pixels to [0, 1].
    channels : int or None
        1 (grayscale) or 3 (RGB); None: 1 when every image is grayscale, else 3.
    interpolation : str
        "bilinear", "bicubic" or "nearest".
    """

    size: tuple[int, int] | None = None
    crop_pct: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"image size {self.size} must be (height, width) >= 1 (--resize 224 or 224,224)")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct={self.crop_pct} must be in (0, 1]")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both --mean and --std (per-channel, e.g. 0.485,0.456,0.406), or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"--std {self.std} must be positive")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels={self.channels} must be 1 or 3")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation {self.interpolation!r} must be bilinear, bicubic or nearest")


def timm_settings(model) -> ImageSettings:
    """The evaluation preprocessing timm records for ``model`` (``timm.data.resolve_data_config``)."""
    from subprune.models.sources import import_timm

    import_timm()
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    return ImageSettings((height, width), float(config.get("crop_pct") or 1.0), tuple(config["mean"]),
                         tuple(config["std"]), channels, config.get("interpolation", "bilinear")
                         if config.get("interpolation") in ("bilinear", "bicubic", "nearest") else "bilinear")


@dataclass
class LoadedData:
    """What a data path held.

    Attributes
    ----------
    inputs : Tensor of shape (N, ...), dict of such Tensors, or None
        Model inputs (None for text).
    labels : Tensor of shape (N,) or None
    texts : list of str or None
        For text files (``hf:`` models).
    classes : list of str or None
        Class names of an image folder, in label order.
    description : dict
        Kind of source, count, preprocessing: recorded in report.json.
    """

    inputs: Tensor | dict | None
    labels: Tensor | None
    texts: list[str] | None
    classes: list[str] | None
    description: dict

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        first = self.inputs if isinstance(self.inputs, Tensor) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def take(self, indices: Tensor) -> Tensor | dict:
        """The inputs of the samples ``indices`` (a Tensor, or a dict of Tensors)."""
        if isinstance(self.inputs, Tensor):
            return self.inputs[indices]
        return {k: v[indices] for k, v in self.inputs.items()}


def _image_files(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}): give {FORMS}")
    parents = {p.parent for p in files}
    if parents == {root}:
        return files, None, None
    if any(p.parent == root for p in files) or any(p.parent.parent != root for p in files):
        raise ValueError(f"{root} mixes images at the top and in sub-folders (or nests deeper): put every image "
                         "in one class sub-folder (root/CLASS/image.png), or all at the top for unlabelled data")
    classes = sorted(p.name for p in parents)
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[p.parent.name] for p in files], classes


def _resample(name: str):
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


def images_to_tensor(images: list, settings: ImageSettings, names: list[str] | None = None) -> Tensor:
    """PIL images -> Tensor of shape (N, C, H, W), float32, preprocessed by ``settings``.

    Raises
    ------
    ValueError
        Images of different sizes without ``settings.size`` (the message names --resize).
    """
    channels = settings.channels or (1 if all(im.mode in ("L", "1", "I;16", "I") for im in images) else 3)
    out = []
    for i, image in enumerate(images):
        image = image.convert("L" if channels == 1 else "RGB")
        if settings.size is not None:
            height, width = settings.size
            scale = min(height, width) / settings.crop_pct / min(image.size[1], image.size[0])
            if settings.crop_pct == 1.0 and image.size[0] * height != image.size[1] * width:
                resized = (width, height)  # no crop asked: resize straight to the size
            else:
                resized = (max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale)))
            image = image.resize(resized, _resample(settings.interpolation))
            left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
        if out and array.shape != out[0].shape:
            where = f" ({names[i]})" if names else ""
            raise ValueError(f"images have different sizes {tuple(out[0].shape[1:])} and {tuple(array.shape[1:])}"
                             f"{where}: pass --resize SIZE (e.g. --resize 224) to give them one size")
        out.append(array)
    x = torch.from_numpy(np.stack(out))  # (N, C, H, W) in [0, 1]
    if settings.mean is not None:
        mean = torch.tensor(settings.mean, dtype=torch.float32)
        std = torch.tensor(settings.std, dtype=torch.float32)
        if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
            raise ValueError(f"--mean/--std have {mean.numel()}/{std.numel()} values for {x.shape[1]}-channel images")
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x


def _load_image_folder(root: Path, settings: ImageSettings, limit: int | None) -> LoadedData:
    from PIL import Image

    files, labels, classes = _image_files(root)
    if limit is not None and len(files) > limit:  # an even draw over the folder, reproducible
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        files = [files[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    images = []
    for f in files:
        with Image.open(f) as im:
            im.load()
            images.append(im)
    x = images_to_tensor(images, settings, [str(f.relative_to(root)) for f in files])
    return LoadedData(x, None if labels is None else torch.tensor(labels), None, classes,
                      {"kind": "image folder", "samples": len(files), "classes": classes,
                       "preprocessing": asdict(settings)})


def _split_mapping(mapping: dict, source: str) -> tuple[Tensor | dict, Tensor | None]:
    tensors = {str(k): (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v)
               for k, v in mapping.items()}
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source} holds non-tensor entries {bad}: save a dict of tensors")
    labels = next((tensors.pop(k) for k in LABEL_KEYS if k in tensors), None)
    if not tensors:
        raise ValueError(f"{source} holds only labels; save the inputs too (key 'x' or the model's argument names)")
    if len(tensors) == 1:
        return next(iter(tensors.values())), labels
    return tensors, labels


def _load_tensor_file(path: Path) -> LoadedData:
    suffix = path.suffix.lower()
    labels = None
    try:
        if suffix == ".npy":
            inputs = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            inputs, labels = _split_mapping(load_file(str(path)), str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Tensor):
                inputs = obj
            elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(v, Tensor) for v in obj):
                inputs, labels = obj
            elif isinstance(obj, dict):
                inputs, labels = _split_mapping(obj, str(path))
            else:
                raise ValueError(f"{path} holds a {type(obj).__name__}; save a Tensor, (inputs, labels) or a dict "
                                 "of Tensors with torch.save")
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} cannot be read as a {suffix} tensor file ({exc})") from exc
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    if first.ndim < 1 or first.shape[0] < 1:
        raise ValueError(f"{path} holds no samples (shape {tuple(first.shape)}); the batch goes along dim 0")
    if labels is not None and labels.shape[:1] != first.shape[:1]:
        raise ValueError(f"{path}: {labels.shape[0]} labels for {first.shape[0]} samples")
    shapes = ({"shape": list(inputs.shape), "dtype": str(inputs.dtype)} if isinstance(inputs, Tensor)
              else {"inputs": {k: list(v.shape) for k, v in inputs.items()}})
    return LoadedData(inputs, labels, None, None, {"kind": f"{suffix} file", "samples": int(first.shape[0]),
                                                   **shapes})


def load_texts(path: str | Path) -> list[str]:
    """Passages of a ``.txt`` (one per non-empty line) or ``.jsonl`` (``{"text": ...}`` per line) file.

    Raises
    ------
    ValueError
        No passage, a line that is not JSON, or a JSON line without a ``text`` string.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".jsonl":
        texts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not JSON ({exc}); a .jsonl file holds one object a line") from exc
            text = record.get("text") if isinstance(record, dict) else record if isinstance(record, str) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number} has no \"text\" string; write {{\"text\": \"...\"}} a line")
            texts.append(text)
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def _is_datasets_directory(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load_datasets_directory(path: Path, settings: ImageSettings, limit: int | None) -> LoadedData:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{path} is a Hugging Face datasets directory; reading it needs `pip install datasets`"
                          ) from exc
    data = datasets.load_from_disk(str(path))
    split = None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else sorted(data)[0]
        data = data[split]
    if limit is not None and len(data) > limit:
        data = data.select(range(limit))
    columns = data.column_names
    label_key = next((k for k in LABEL_KEYS if k in columns), None)
    labels = torch.tensor(data[label_key]) if label_key else None
    described = {"kind": "datasets directory", "split": split, "samples": len(data), "columns": columns}
    if "text" in columns and not any(k in columns for k in ("image", "img", *INPUT_KEYS, "input_ids")):
        return LoadedData(None, labels, list(data["text"]), None, described)
    image_key = next((k for k in ("image", "img") if k in columns), None)
    if image_key:
        x = images_to_tensor(list(data[image_key]), settings)
        described["preprocessing"] = asdict(settings)
        return LoadedData(x, labels, None, None, described)
    numeric = {k: torch.tensor(np.asarray(data[k])) for k in columns if k != label_key and k != "text"}
    if not numeric:
        raise ValueError(f"{path}: no image, text or numeric column in {columns}")
    inputs, _ = _split_mapping(numeric, str(path))
    return LoadedData(inputs, labels, None, None, described)


def load_inputs(path: str | Path, settings: ImageSettings | None = None, limit: int | None = None) -> LoadedData:
    """Read calibration (or evaluation) data from ``path``; see the module docstring for the forms.

    Parameters
    ----------
    path : path
    settings : ImageSettings, optional
        Preprocessing of images (default: keep their size, scale to [0, 1]).
    limit : int, optional
        Read at most this many images of a folder (an even, reproducible draw)
        or rows of a datasets directory.

    Returns
    -------
    LoadedData

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        A form that is not understood (the message lists them), unreadable
        files, images of different sizes without a size.
    ImportError
        A datasets directory without the ``datasets`` package.
    """
    path = Path(path)
    settings = settings or ImageSettings()
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist: give {FORMS}")
    if path.is_dir():
        if _is_datasets_directory(path):
            return _load_datasets_directory(path, settings, limit)
        return _load_image_folder(path, settings, limit)
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return _load_tensor_file(path)
    if suffix in TEXT_SUFFIXES:
        texts = load_texts(path)
        return LoadedData(None, None, texts, None, {"kind": f"{suffix} text", "samples": len(texts)})
    raise ValueError(f"--data {path}: files ending in {suffix or '(nothing)'} are not understood; give {FORMS}")
