"""Export a pruned model: ONNX (any save), or a config plain ``transformers`` loads (``hf:`` saves).

* :func:`export_onnx` writes an ONNX graph with ``torch.onnx.export`` (the
  TorchScript-based exporter, ``dynamo=False``, which needs only ``onnx``) and a
  dynamic batch axis on every input and output; :func:`onnx_parity` runs it
  with onnxruntime and returns the largest difference to the torch model.
* :func:`export_transformers` writes a directory whose ``config.json``
  describes the pruned widths in transformers' own keys, so
  ``AutoModel.from_pretrained`` loads it without subprune. That is possible
  only where the widths are the same in every block and the config can say
  them: the FFN width (``intermediate_size``, ``n_inner``, ``ffn_dim``) always,
  the number of heads only for configs with an explicit ``head_dim`` (LLaMA,
  Mistral, Qwen2, ...; in BERT, GPT-2 and OPT the head size is hidden / heads).
  Every other save is reloaded with :func:`subprune.hf.load_pruned`. The export
  is checked: the reloaded model's outputs must equal the pruned model's.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn

from subprune.calibration import Batch, as_calibration

__all__ = ["export_onnx", "export_transformers", "onnx_parity"]

PARITY_TOLERANCE = 1e-4
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


def _batch(example) -> Batch:
    return example if isinstance(example, Batch) else as_calibration(example).head(2)


def export_onnx(model: nn.Module, example, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis.

    Parameters
    ----------
    model : nn.Module
        Not modified (exported in eval mode, its training flags restored).
    example : Tensor of shape (B, ...), Batch, or any form ``as_calibration`` takes
        Example inputs; their names in the graph are the ``forward`` parameter
        names (``input`` for one positional input).
    path : path
    opset : int

    Returns
    -------
    Path of the written file.

    Raises
    ------
    ImportError
        If the ``onnx`` package is missing.
    """
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the onnx package: pip install onnx==1.23.2 (the Makefile installs it)")
    batch = _batch(example)
    names = _input_names(model, batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # renamed over path once complete
    axes = {0: "batch", 1: "sequence"} if isinstance(model, TokenModel) else {0: "batch"}
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, tuple(batch.args), str(partial), kwargs=dict(batch.kwargs) or None, input_names=names,
                output_names=["output"], opset_version=opset,
                dynamic_axes={**{n: axes for n in names}, "output": axes}, dynamo=False,
            )
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        model.train(training)
        partial.unlink(missing_ok=True)
    return path


def _input_names(model: nn.Module, batch: Batch) -> list[str]:
    """The ``forward`` parameter names of the batch's Tensor inputs, in call order."""
    import inspect

    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    names = [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(len(batch.args))]
    if len(batch.args) == 1 and not batch.kwargs:
        names = ["input"]
    return names + [k for k, v in batch.kwargs.items() if isinstance(v, Tensor)]


def onnx_parity(model: nn.Module, path: str | Path, example) -> float:
    """Largest absolute difference between onnxruntime's outputs of ``path`` and ``model``'s on ``example``.

    Raises
    ------
    ImportError
        If onnxruntime is not installed.
    """
    import onnxruntime

    batch = _batch(example)
    names = _input_names(model, batch)
    tensors = [*batch.args, *(v for v in batch.kwargs.values() if isinstance(v, Tensor))]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True) if n in wanted}
    got = torch.from_numpy(session.run(None, feed)[0])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = batch.run(model)
    finally:
        model.train(training)
    out = out if isinstance(out, Tensor) else out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return float((got.double() - out.detach().cpu().double()).abs().max())


def export_transformers(directory: str | Path, target: str | Path) -> Path:
    """Write the ``hf:`` save ``directory`` as a plain transformers directory at ``target``.

    Returns
    -------
    Path of ``target``.

    Raises
    ------
    ValueError
        Widths differ between blocks, or the config cannot express pruned heads
        (no explicit ``head_dim``); the message says to use ``subprune.hf.load_pruned``.
    """
    import transformers

    from subprune.hf.serialization import WIDTHS_KEY, is_pruned_directory, load_pruned

    directory, target = Path(directory), Path(target)
    if not is_pruned_directory(directory):
        raise ValueError(f"{directory} is not an hf: save of subprune (no {WIDTHS_KEY} in config.json)")
    config = json.loads((directory / "config.json").read_text())
    record = config.pop(WIDTHS_KEY)
    general = "reload it with subprune.hf.load_pruned, which handles any widths"
    for key in ("heads", "kv_heads", "ffn"):
        values = {layer[key] for layer in record}
        if len(values) != 1:
            raise ValueError(f"the pruned {key} differ between blocks ({sorted(values)}): a transformers config holds "
                             f"one value; {general}")
    widths = record[0]
    ffn_keys = [k for k in FFN_KEYS if config.get(k) is not None]
    if not ffn_keys and "ffn" in widths:
        ffn_keys = ["n_inner"] if config.get("model_type") == "gpt2" else []
    if not ffn_keys:
        raise ValueError(f"config.json of {directory} has no FFN width key ({', '.join(FFN_KEYS)}); {general}")
    for key in ffn_keys:
        config[key] = widths["ffn"]
    heads = config.get("num_attention_heads", config.get("n_head"))
    if widths["heads"] != heads:
        if config.get("head_dim") is None:
            raise ValueError(f"{config.get('model_type')} configs derive the head size from hidden / heads, so "
                             f"{widths['heads']} of {heads} heads cannot be written as a config; {general}")
        config["num_attention_heads"] = widths["heads"]
        if "num_key_value_heads" in config:
            config["num_key_value_heads"] = widths["kv_heads"]
    causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in config.get("architectures") or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = load_pruned(directory, auto)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    plain = auto.from_pretrained(target, local_files_only=True).eval()
    ids = torch.randint(0, min(1000, config.get("vocab_size", 1000)), (2, 12), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids), plain(input_ids=ids)
    first = (lambda o: o.logits if hasattr(o, "logits") else o.last_hidden_state)  # noqa: E731
    if not torch.allclose(first(a), first(b), rtol=1e-4, atol=1e-5):
        raise ValueError(f"transformers loads {target} but its outputs differ from the pruned model's; {general}")
    (target / "SUBPRUNE.md").write_text(
        f"Pruned by subprune from {directory}: every block keeps {widths['heads']} query heads, "
        f"{widths['kv_heads']} key/value heads and {widths['ffn']} FFN neurons. Plain "
        f"`transformers.{auto.__name__}.from_pretrained` (class {type(model).__name__}) loads it; "
        "its outputs were checked equal to the pruned model's.\n")
    return target


class TokenModel(nn.Module):
    """``forward(input_ids, attention_mask)`` -> the first output (logits or last hidden state) of a transformer.

    The TorchScript-based ONNX exporter needs plain named Tensor inputs and a
    Tensor output; transformers' ``forward`` takes many optional arguments and
    returns a ModelOutput.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _example_for(directory: Path, saved: dict, data: str | None, model: nn.Module):
    """Example inputs for the export: --data, the recorded data, or the registered model's test images."""
    from subprune.datafiles import ImageSettings, load_inputs

    path = data or saved.get("data")
    if path is not None:
        recorded = (saved.get("data_description") or {}).get("preprocessing") if data is None else None
        settings = ImageSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}) \
            if recorded else None
        loaded = load_inputs(path, settings, limit=8)
        return loaded.take(torch.arange(min(8, len(loaded))))
    from subprune.data import load_dataset
    from subprune.models import MODELS, get_spec

    name = saved.get("model") or json.loads((directory / "architecture.json").read_text()).get("base_model")
    if name not in MODELS:
        raise ValueError(f"{directory}: no example inputs known; pass --data PATH")
    spec = get_spec(name)
    images, _ = load_dataset(saved.get("dataset") or spec.dataset, "test")
    return spec.preprocess(images[:8])


def _check_onnx_target(path: Path, overwrite: bool) -> None:
    """``--onnx`` names a new file, or an existing one ``--overwrite`` allows replacing (ValueError otherwise)."""
    if path.is_dir():
        raise ValueError(f"--onnx {path} is a directory: name the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise ValueError(f"--onnx {path} exists: choose another path, or pass --overwrite to replace it")


def export_command(args: argparse.Namespace, console: Console) -> None:
    """``subprune export DIR --onnx FILE`` / ``--transformers DIR``."""
    directory = Path(args.directory)
    if args.onnx is None and args.transformers is None:
        raise ValueError("export needs --onnx FILE and/or --transformers DIR")
    if args.onnx is not None:
        _check_onnx_target(Path(args.onnx), getattr(args, "overwrite", False))
    is_hf = (directory / "config.json").is_file()
    if args.transformers is not None:
        if not is_hf:
            raise ValueError("--transformers applies to hf: saves (directories with config.json); use --onnx")
        out = export_transformers(directory, args.transformers)
        console.print(f"wrote {out}: plain transformers from_pretrained loads it (outputs checked)", markup=False)
    if args.onnx is None:
        return
    report_file = directory / "report.json"
    saved = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if is_hf:
        from subprune.hf.models import load_transformer
        from subprune.hf.text import tokenize

        loaded, tokenizer = load_transformer(directory)
        model = TokenModel(loaded)
        example = tokenize(tokenizer, ["subprune exports this model.", "A second, longer example sentence here.",
                                       "Token ids and an attention mask go in; the first output comes out."])
    else:
        from subprune.serialization import load_pruned

        model = load_pruned(directory)
        example = _example_for(directory, saved, args.data, model)
    example = as_calibration(example, model)
    path = export_onnx(model, example.head(2), args.onnx, opset=args.opset)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, dynamic batch axis)", markup=False)
    if args.no_check:
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        console.print("onnxruntime is not installed: parity not checked (pip install onnxruntime)", markup=False)
        return
    worst = max(onnx_parity(model, path, batch) for batch in example.batches(len(example)))
    console.print(f"onnxruntime vs torch on {len(example)} samples (batch size {len(example)}, exported with 2): "
                  f"max |difference| = {worst:.2e}", markup=False)
    if not worst <= PARITY_TOLERANCE:
        raise RuntimeError(f"the ONNX model's outputs differ from torch's by {worst:.2e} > {PARITY_TOLERANCE}")
