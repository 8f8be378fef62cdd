"""``subprune prune/evaluate`` for the user's own model and data (``--model X --data PATH``).

    subprune prune --model my_models.py:make_net --weights net.safetensors --data images/ --keep 0.5 --out DIR
    subprune prune --model timm:resnet18 --model-kwargs '{"num_classes": 10}' --weights w.pt --data calib.npy
    subprune evaluate DIR                     # rebuilt from the recorded factory, on the held-out samples
    subprune evaluate DIR --data other.npy

The model comes from :mod:`subprune.models.sources`, the data from
:mod:`subprune.datafiles`; the pruning is :func:`subprune.prune`, as everywhere.
``--calib`` samples drawn with ``--seed`` calibrate; the samples left (at most
``HELD_OUT``) measure how closely the pruned model follows the dense one
(top-1 agreement, relative output error) and, when the data has labels, both
accuracies. The report records the model source, the data path and its
preprocessing, so ``subprune evaluate DIR`` measures the same held-out samples.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from subprune.calibration import Batch, as_calibration
from subprune.data import calibration_indices
from subprune.datafiles import ImageSettings, LoadedData, load_inputs, timm_settings
from subprune.evaluate import compare_outputs, count_flops, count_parameters, measure_latency
from subprune.methods import METHODS
from subprune.models.sources import ModelSource, parse_model
from subprune.pipeline import MIN_CALIBRATION_SAMPLES, PruneConfig, prune
from subprune.report import build_report, print_report
from subprune.serialization import REPORT_FILE, save_pruned

DEFAULT_CALIBRATION = 512
HELD_OUT = 1000


def _floats(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from exc


def image_settings(args: argparse.Namespace, source: ModelSource | None, model) -> ImageSettings:
    """Image preprocessing: the flags, over the timm model's own for timm models; else the images as they are."""
    size = None
    if args.resize:
        parts = _floats("--resize", args.resize)
        if len(parts) not in (1, 2) or any(p != int(p) or p < 1 for p in parts):
            raise ValueError(f"--resize {args.resize!r} must be SIZE or HEIGHT,WIDTH (positive integers)")
        size = (int(parts[0]), int(parts[-1]))
    mean, std = _floats("--mean", args.mean), _floats("--std", args.std)
    if source is not None and source.kind == "timm":  # the model's own preprocessing; the flags override it
        try:
            base = timm_settings(model)
        except ImportError:
            base = None
        if base is not None:
            return dataclasses.replace(base, size=size or base.size, channels=args.channels or base.channels,
                                       **({"mean": mean, "std": std} if mean is not None or std is not None else {}))
    return ImageSettings(size=size, mean=mean, std=std, channels=args.channels)


def _split(n: int, calib: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration indices (``calib``) and held-out indices (the rest, at most HELD_OUT), reproducibly."""
    drawn = calibration_indices(n, n, seed)
    return drawn[:calib], drawn[calib : calib + HELD_OUT]


def _measures(dense, pruned, data: LoadedData, indices: torch.Tensor, batch_size: int, where: str) -> dict:
    """Parameters, FLOPs, latency and the dense/pruned comparison on ``indices``."""
    inputs = data.take(indices)
    labels = None if data.labels is None else data.labels[indices]
    compared = compare_outputs(dense, pruned, inputs, labels=labels, batch_size=batch_size)
    example = as_calibration(inputs, dense).head(min(64, len(indices)))
    out = {"measured_on": where, "measured_samples": compared["samples"], "agreement": compared["agreement"],
           "relative_output_error": compared["relative_error"], "latency_batch": len(example)}
    if "dense_accuracy" in compared:
        out.update(dense_accuracy=compared["dense_accuracy"], pruned_accuracy=compared["pruned_accuracy"])
    one = Batch(tuple(a[:1] for a in example.args), {k: v[:1] if isinstance(v, torch.Tensor) else v
                                                     for k, v in example.kwargs.items()})
    for tag, model in (("dense", dense), ("pruned", pruned)):
        out[f"{tag}_params"] = count_parameters(model)
        out[f"{tag}_flops"] = count_flops(model, one)
        out[f"{tag}_latency_s"] = measure_latency(model, example, repeats=10, warmup=2)
    return out


def cmd_prune_user(args: argparse.Namespace, console: Console) -> dict:
    """Prune a model from any source on data from a file or folder; print, save; return the report."""
    unsupported = [flag for flag, given in (
        ("--budget accuracy", args.budget == "accuracy"), ("--budget flap (hf: models only)", args.budget == "flap"),
        ("--finetune", args.finetune != "none"),
        ("--finetune-epochs", args.finetune_epochs is not None), ("--dataset", args.dataset is not None),
        ("--held-out", args.held_out is not None),
    ) if given]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} not supported with --data yet (they need a registered model "
                         "and its dataset); drop them")
    if args.data is None:
        raise ValueError(f"--model {args.model} needs calibration inputs: pass --data PATH (a folder of images, a "
                         ".npy/.pt/.safetensors file or a datasets directory)")
    source = parse_model(args.model, args.weights, args.model_kwargs)
    model = source.load()
    data = load_inputs(args.data, image_settings(args, source, model))
    if data.texts is not None:
        raise ValueError(f"--data {args.data} holds text: text calibrates hf: (transformers) models; give image or "
                         "tensor data for this model")
    n = len(data)
    calib = min(DEFAULT_CALIBRATION, n) if args.calib is None else args.calib
    if not MIN_CALIBRATION_SAMPLES <= calib <= n:
        raise ValueError(f"--calib {calib} must be between {MIN_CALIBRATION_SAMPLES} and the {n} samples of "
                         f"{args.data}")
    method = METHODS[args.method]
    if method.needs_labels and data.labels is None:
        raise ValueError(f"--method {args.method} needs labels and {args.data} has none: use class sub-folders "
                         "(root/CLASS/image.png) or a file with a 'labels' entry, or a method without labels")
    if method.needs_score_data:
        raise ValueError(f"--method {args.method} needs a registered model's training split; use layer-greedyfs")
    if args.threads:
        torch.set_num_threads(args.threads)
    calib_idx, held_idx = _split(n, calib, args.seed)
    keep = dict(args.keep_site) if args.keep_site else None if args.compression is not None else args.keep
    config = PruneConfig(
        method=args.method, keep=keep, compression=args.compression,
        budget="uniform" if args.budget == "auto" else args.budget,
        reweight=not args.no_reweight,
        layers=tuple(s.strip() for s in args.layers.split(",")) if args.layers else None,
        epsilon=args.epsilon, ridge=args.ridge, batch_size=args.batch_size, seed=args.seed, precision=args.precision,
        progress=not args.quiet, coupled=args.coupled, interpolation_ridge=args.interpolation_ridge,
    )
    labels = None if data.labels is None else data.labels[calib_idx]
    result = prune(model, data.take(calib_idx), config, labels=labels if method.needs_labels else None)
    where = "held-out samples" if held_idx.numel() else "calibration samples (none held out)"
    measures = _measures(model, result.model, data, held_idx if held_idx.numel() else calib_idx,
                         args.batch_size, where)
    settings = {"model": source.name, "model_source": source.record(), "data": str(Path(args.data).resolve()),
                "data_description": data.description, "calibration_samples": calib, "seed": args.seed,
                "held_out_samples": int(held_idx.numel())}
    report = build_report(result, measures, settings)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)
    if args.out:
        save_pruned(result.model, args.out, base_model=source.target if source.kind == "registered" else None,
                    extra_json={REPORT_FILE: report}, overwrite=args.overwrite, source=source.record())
        if not args.json:
            console.print(f"saved the pruned model and {REPORT_FILE} to {args.out} (reload: subprune.load_pruned)")
    return report


def evaluate_user(directory: str, pruned, saved: dict, data_path: str | None, console: Console,
                  batch_size: int = 256) -> dict:
    """``subprune evaluate DIR`` for a save of a user model: compare with the rebuilt dense model.

    Without ``data_path`` the recorded data is reloaded with its preprocessing
    and the held-out samples of the pruning run are measured; with it, all of
    its samples.
    """
    source_record = saved.get("model_source")
    path = data_path or saved.get("data")
    if path is None:
        raise ValueError("the save records no data: pass --data PATH")
    recorded = (saved.get("data_description") or {}).get("preprocessing")
    data = load_inputs(path, ImageSettings(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in recorded.items()}) if recorded else None)
    if data_path is None:
        _, indices = _split(len(data), saved["calibration_samples"], saved["seed"])
        where = "the held-out samples of the pruning run"
        if not indices.numel():
            indices, where = torch.arange(len(data)), "all samples (none were held out)"
    else:
        indices, where = torch.arange(len(data)), f"all {len(data)} samples of {data_path}"
    out = {"directory": directory, "params": count_parameters(pruned)}
    dense = None
    if source_record and source_record.get("weights") is None and source_record.get("kind") != "registered":
        console.print("the dense model was pruned without --weights (a random initialisation, which cannot be "
                      "rebuilt): no comparison with it", markup=False, soft_wrap=True)
    elif source_record:
        try:
            dense = ModelSource.from_record(source_record).load()
        except (OSError, ValueError, ImportError) as exc:
            console.print(f"dense model not rebuilt ({exc}): no comparison", markup=False, soft_wrap=True)
    if dense is not None:
        measures = _measures(dense, pruned, data, indices, batch_size, where)
        out.update(measures)
        console.print(f"{directory}: {out['params']:,} parameters (dense {measures['dense_params']:,}), on {where}: "
                      f"top-1 agreement with the dense model {measures['agreement']:.2%}, relative output error "
                      f"{measures['relative_output_error']:.4f}", markup=False, soft_wrap=True)
        if "pruned_accuracy" in measures:
            console.print(f"accuracy: pruned {measures['pruned_accuracy']:.2%}, dense "
                          f"{measures['dense_accuracy']:.2%}", markup=False, soft_wrap=True)
    elif data.labels is not None:
        compared = compare_outputs(pruned, pruned, data.take(indices), labels=data.labels[indices])
        out["pruned_accuracy"] = compared["pruned_accuracy"]
        console.print(f"{directory}: {out['params']:,} parameters, accuracy {compared['pruned_accuracy']:.2%} on "
                      f"{where}", markup=False, soft_wrap=True)
    recorded_agreement = saved.get("agreement")
    if recorded_agreement is not None and data_path is None:
        console.print(f"agreement recorded when it was saved: {recorded_agreement:.2%}", markup=False, soft_wrap=True)
    return out
