"""The ``subprune`` command line: a thin layer over the library (argparse).

    subprune prune --model lenet --dataset mnist --method asym --keep 0.25 --calib 512 --seed 0 --out DIR
    subprune prune --model lenet --method weightnorm --compression 8 --no-reweight
    subprune prune --model lenet --method layer --compression 8 --budget curve
    subprune prune --model lenet --method asym --compression 16 --budget accuracy --held-out 1000
    subprune prune --model lenet --method asym --compression 16 --finetune limited
    subprune inspect --model lenet
    subprune inspect --model hf:PATH
    subprune evaluate DIR
    subprune evaluate --model hf:PATH --dataset text:wikipedia
    subprune prune --model my_net.py:build --weights net.safetensors --data images/ --keep 0.5 --out DIR
    subprune prune --model timm:resnet18 --data calib.npy --out DIR
    subprune prune --model hf:PATH --data passages.jsonl --out DIR
    subprune export DIR --onnx model.onnx
    subprune list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from subprune.accuracy_budget import equal_accuracy_keep
from subprune.data import DATASETS, calibration_indices, load_dataset
from subprune.evaluate import accuracy, count_parameters
from subprune.finetune import finetune, paper_schedule
from subprune.hf.baselines import BASELINES
from subprune.hf.prune import SWAP_METHODS
from subprune.methods import METHODS
from subprune.models import MODELS, get_spec, load_model
from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import MIN_CALIBRATION_SAMPLES, PruneConfig, prune
from subprune.report import build_report, compare_models, print_report
from subprune.saving import SaveInterrupted, current_version
from subprune.serialization import REPORT_FILE, check_target, load_pruned, save_pruned, state_bytes
from subprune.sites import find_sites

HF_BASELINES = {**BASELINES, **SWAP_METHODS}  # methods of the transformer path only


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"keep ratio {text!r} is not a number") from exc
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"keep ratio {value} is out of range: it must be in (0, 1]")
    return value


def _compression(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"compression ratio {text!r} is not a number") from exc
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"compression ratio {value} must be a finite number >= 1 "
                                         "(dense / pruned parameters)")
    return value


def _site_ratio(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--keep-site expects NAME=RATIO, got {text!r}")
    return name, _ratio(value)


def _model_name(text: str) -> str:
    location, sep, name = text.rpartition(":")
    if text in MODELS or (sep and location and name):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}: choose one of {', '.join(sorted(MODELS))}, "
                                     "hf:PATH (a transformers model directory; hf:minilm for all-MiniLM-L6-v2, "
                                     "hf:smollm2-135m for SmolLM2-135M-Instruct), "
                                     "timm:NAME, torchvision:NAME, module.path:factory or file.py:factory")


MODEL_HELP = (f"registered model ({', '.join(sorted(MODELS))}), hf:PATH (transformers), timm:NAME, "
              "torchvision:NAME, or your own: module.path:factory or file.py:factory (with --weights)")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """--weights and --model-kwargs: the user's own model."""
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="state dict for --model (.safetensors, or a torch.save file read with weights_only=True)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the factory / timm / torchvision constructor, "
                        "e.g. '{\"num_classes\": 10}'")


def _add_data(p: argparse.ArgumentParser) -> None:
    """--data and the image preprocessing flags."""
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your own data: a folder of images (class sub-folders give labels), a .npy/.pt/.safetensors "
                        "tensor file, a .txt/.jsonl text file (hf: models), or a datasets directory (save_to_disk)")
    p.add_argument("--resize", default=None, metavar="SIZE",
                   help="images: resize (short side, centre crop) to SIZE or HEIGHT,WIDTH (timm models: their own)")
    p.add_argument("--mean", default=None, help="images: per-channel mean to subtract, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", default=None, help="images: per-channel std to divide by, e.g. 0.229,0.224,0.225")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="images: 1 (grayscale) or 3 (RGB); default: 1 if all images are grayscale")


def _dataset_name(text: str) -> str:
    if text in DATASETS or text == "text:wikipedia":
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}: choose one of {', '.join(sorted(DATASETS))} "
                                     "or text:wikipedia (for hf: models)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the problem and where the usage is, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="subprune",
        description="Data-efficient structured pruning (El Halabi et al., NeurIPS 2022).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a pretrained model with unlabeled calibration samples")
    p.add_argument("--model", default="lenet", type=_model_name, help=MODEL_HELP)
    _add_model_source(p)
    _add_data(p)
    p.add_argument("--dataset", default=None, type=_dataset_name,
                   help="calibration (train split) and test data; default: the model's own (text:wikipedia for hf:)")
    p.add_argument("--method", default="asym", choices=[*METHODS, *HF_BASELINES],
                   help="layer=LayerInChange, seq=SeqInChange, asym=AsymInChange (default), or a baseline "
                        "(see `subprune list`); actgrad methods use the training labels; "
                        f"{', '.join(HF_BASELINES)} are for hf: models")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--keep", type=_ratio, default=0.5, help="keep ratio of every site, in (0, 1] (default 0.5)")
    target.add_argument("--keep-site", type=_site_ratio, action="append", metavar="NAME=RATIO",
                        help="per-site keep ratio (repeatable); sites not named are not pruned")
    target.add_argument("--compression", type=_compression, default=None,
                        help="target compression ratio of whole-network parameters (e.g. 2, 4, 8, 16, 32, 64)")
    p.add_argument("--heads", type=_ratio, default=None, help="hf: models: keep ratio of attention heads")
    p.add_argument("--ffn", type=_ratio, default=None, help="hf: models: keep ratio of FFN neurons")
    p.add_argument("--params", type=_ratio, default=None,
                   help="hf: models: keep this fraction of the prunable attention + FFN parameters (global target)")
    p.add_argument("--budget", default="auto", choices=["auto", "uniform", "curve", "flap", "accuracy"],
                   help="channels per site: the method's own (auto: flap for --method flap, else uniform), "
                        "uniform keep ratio, from the objective curves f(S_k), FLAP's adaptive structure (hf: "
                        "models), or the paper's equal-accuracy-loss rule (one-site sweeps on a held-out training "
                        "slice, cached)")
    p.add_argument("--held-out", type=_bounded("--held-out", 0, integer=True), default=None,
                   help="training images (disjoint from the calibration set) for --budget accuracy (default 1000)")
    p.add_argument("--cache", default=None, help="cache directory of --budget accuracy (default ~/.cache/subprune)")
    p.add_argument("--layers", default=None, help="comma-separated producer layers to prune (default: all)")
    p.add_argument("--no-reweight", action="store_true", help="do not refit the consumer weights")
    p.add_argument("--coupled", action="store_true",
                   help="also prune channels tied by residual additions, as coupled sites")
    p.add_argument("--calib", type=_bounded("--calib", MIN_CALIBRATION_SAMPLES, integer=True), default=None,
                   help="number of calibration samples (default 512; 128 passages for hf: models)")
    p.add_argument("--finetune", default="none", choices=["none", "limited", "full"],
                   help="fine-tune the pruned model with labels (the paper's Adam schedule): on the calibration "
                        "images only (limited) or the whole training split (full); reports accuracy before/after")
    p.add_argument("--finetune-epochs", type=_bounded("--finetune-epochs", 1, integer=True), default=None, metavar="N",
                   help="override the schedule's epochs (paper: 10 for lenet, 20 otherwise)")
    p.add_argument("--seed", type=_bounded("--seed", 0, integer=True), default=0,
                   help="seed of the calibration draw and stochastic greedy")
    p.add_argument("--epsilon", type=_bounded("--epsilon", 0, 1), default=0.0,
                   help="stochastic greedy epsilon in [0, 1)")
    p.add_argument("--ridge", type=_bounded("--ridge", 0), default=0.0, help="relative ridge (times mean diag of G)")
    p.add_argument("--target", default="sublayer", choices=["sublayer", "residual"],
                   help="hf: --method asym: fit each consumer to its sublayer's dense output (sublayer), or to that "
                        "plus the upstream residual-stream error it can absorb (residual; pre-norm models)")
    p.add_argument("--interpolation-ridge", type=_bounded("--interpolation-ridge", 0), default=0.0, metavar="R",
                   help="relative ridge only at the sites whose refit has fewer calibration rows than twice its kept "
                        "columns (a flatten into a wide Linear with a few hundred images: 0.1; docs/zoo.md)")
    p.add_argument("--units", default="kv", choices=["kv", "qheads"],
                   help="hf: grouped-query attention: prune key/value groups with their query heads (kv), or query "
                        "heads inside the groups, keeping the shared keys/values (qheads)")
    p.add_argument("--batch-size", type=_bounded("--batch-size", 1, integer=True), default=128,
                   help="calibration batch size")
    p.add_argument("--precision", default="float64", choices=["float64", "mixed"],
                   help="Gram statistics: every product in float64, or float32 products over blocks of rows added "
                        "to float64 sums (the solver is float64 either way)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="hf: models: keep the block engine's activation caches in memory-mapped files in this "
                        "existing directory instead of memory (same results)")
    p.add_argument("--threads", type=_bounded("--threads", 1, integer=True), default=None,
                   help="torch CPU threads (>= 1)")
    p.add_argument("--out", default=None, help="directory for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-subprune --out directory")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("inspect", help="list a model's pruning sites and the layers that cannot be pruned")
    p.add_argument("--model", default="lenet", type=_model_name, help=MODEL_HELP)
    _add_model_source(p)
    _add_data(p)
    p.add_argument("--json", action="store_true", help="hf: models: print the description as JSON")
    p.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES),
                   help="inspect a randomly initialised reference CNN instead of a registered model")
    p.add_argument("--coupled", action="store_true",
                   help="also find coupled sites (channels tied by residual additions across producers)")

    p = sub.add_parser("evaluate", help="reload a saved pruned model and measure its test accuracy")
    p.add_argument("directory", nargs="?", default=None, help="a directory written by `subprune prune --out`")
    p.add_argument("--model", default=None, type=_model_name,
                   help="hf:PATH: evaluate a transformers model directory (dense or pruned) instead")
    p.add_argument("--reference", default=None, type=_model_name,
                   help="hf: models: the dense model to compare with (default: the model in report.json)")
    p.add_argument("--dataset", default=None, type=_dataset_name)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="evaluate a save of your own model on this data (default: the held-out samples it recorded)")
    p.add_argument("--json", action="store_true", help="hf: models: print the measures as JSON")
    p.add_argument("--threads", type=_bounded("--threads", 1, integer=True), default=None,
                   help="torch CPU threads (>= 1)")

    p = sub.add_parser("export", help="export a saved pruned model to ONNX (or, for hf: saves, a plain "
                                      "transformers config)")
    p.add_argument("directory", help="a directory written by `subprune prune --out`")
    p.add_argument("--onnx", default=None, metavar="FILE", help="write an ONNX model (dynamic batch axis)")
    p.add_argument("--transformers", default=None, metavar="DIR",
                   help="hf: saves: write a directory plain transformers from_pretrained loads (uniform widths only)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="example inputs for the ONNX trace (default: the recorded data or dataset)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")

    sub.add_parser("list", help="list the registered models, the model forms and the methods")
    return parser


def _bounded(flag: str, low: float, high: float = float("inf"), integer: bool = False):
    """An argparse type: a number in [low, high), so finite and not NaN, named by its flag in errors."""
    def parse(text: str) -> float | int:
        try:
            value = int(text) if integer else float(text)
        except ValueError as exc:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not {kind}") from exc
        if not low <= value < high:
            kind = "an integer" if integer else "a finite number"
            upper = "" if high == float("inf") else f" and < {high}"
            raise argparse.ArgumentTypeError(f"{flag} {value} must be {kind} >= {low}{upper}")
        return value
    return parse


def _check_out(directory: str | None, overwrite: bool) -> None:
    if directory is None:
        return
    check_target(directory, overwrite, (REPORT_FILE,))


def cmd_prune(args: argparse.Namespace, console: Console) -> None:
    _check_out(args.out, args.overwrite)
    if args.model.startswith("hf:"):
        from subprune.hf.cli import cmd_prune_transformer

        if args.weights or args.model_kwargs:
            raise ValueError("--weights and --model-kwargs are not for hf: models: the directory holds the weights")
        cmd_prune_transformer(args, console)
        return
    if args.model not in MODELS or args.data is not None or args.weights is not None:
        if (args.heads is not None or args.ffn is not None or args.params is not None or args.units != "kv"
                or args.target != "sublayer"):
            raise ValueError("--heads, --ffn, --params, --units and --target apply to hf: (transformers) models only; "
                             "use --keep or --compression for this model")
        if args.cache_dir is not None:
            raise ValueError("--cache-dir applies to hf: (transformers) models only: the block engine's caches")
        if args.method in HF_BASELINES:
            raise ValueError(f"--method {args.method} is for hf: (transformers) models only; for this model choose "
                             "one of " + ", ".join(METHODS))
        from subprune.usercli import cmd_prune_user

        cmd_prune_user(args, console)
        return
    if (args.heads is not None or args.ffn is not None or args.params is not None or args.units != "kv"
            or args.target != "sublayer"):
        raise ValueError("--heads, --ffn, --params, --units and --target apply to hf: (transformers) models only; "
                         "use --keep or --compression for this model")
    if args.cache_dir is not None:
        raise ValueError("--cache-dir applies to hf: (transformers) models only: the block engine's caches")
    if args.finetune_epochs is not None and args.finetune == "none":
        raise ValueError("--finetune-epochs needs --finetune limited or --finetune full")
    if args.method in HF_BASELINES:
        raise ValueError(f"--method {args.method} is for hf: (transformers) models only; for this model choose "
                         "one of " + ", ".join(METHODS))
    if args.budget == "flap":
        raise ValueError("--budget flap (FLAP's adaptive structure) is for hf: (transformers) models only; "
                         "use --budget uniform or curve for this model")
    if args.held_out is not None and args.budget != "accuracy":
        raise ValueError("--held-out applies only to --budget accuracy; drop it or add --budget accuracy")
    args.held_out = 1000 if args.held_out is None else args.held_out
    if args.layers is not None and not [s for s in args.layers.split(",") if s.strip()]:
        raise ValueError("--layers names no layer; give comma-separated producer names (see `subprune inspect`) "
                         "or drop it to prune every site")
    if args.keep_site:
        names = [name for name, _ in args.keep_site]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"--keep-site names {', '.join(repeated)} more than once; give each site one ratio")
    args.calib = 512 if args.calib is None else args.calib
    if args.threads:
        torch.set_num_threads(args.threads)
    keep = dict(args.keep_site) if args.keep_site else None if args.compression is not None else args.keep
    config = PruneConfig(
        method=args.method, keep=keep, compression=args.compression,
        budget="uniform" if args.budget in ("accuracy", "auto") else args.budget,
        reweight=not args.no_reweight,
        layers=tuple(s.strip() for s in args.layers.split(",")) if args.layers else None,
        epsilon=args.epsilon, ridge=args.ridge, batch_size=args.batch_size, seed=args.seed, precision=args.precision,
        progress=not args.quiet, coupled=args.coupled, interpolation_ridge=args.interpolation_ridge,
    )
    spec = get_spec(args.model)
    if args.dataset is not None and args.dataset != spec.dataset:
        raise ValueError(f"model {args.model} was trained on {spec.dataset}, not {args.dataset}: its accuracy on "
                         f"{args.dataset} means nothing; drop --dataset or use --dataset {spec.dataset}")
    dataset = spec.dataset
    train_x, train_y = load_dataset(dataset, "train")
    test_x, test_y = load_dataset(dataset, "test")
    if not MIN_CALIBRATION_SAMPLES <= args.calib <= train_x.shape[0]:
        raise ValueError(f"--calib {args.calib} must be between {MIN_CALIBRATION_SAMPLES} and the "
                         f"{train_x.shape[0]} training samples of {dataset}")
    extra = args.held_out if args.budget == "accuracy" else 0
    if args.budget == "accuracy" and not 1 <= args.held_out <= train_x.shape[0] - args.calib:
        raise ValueError(f"--held-out {args.held_out} must be between 1 and the {train_x.shape[0] - args.calib} "
                         "training samples left after the calibration set")
    drawn = calibration_indices(train_x.shape[0], args.calib + extra, args.seed)
    indices, held_out = drawn[: args.calib], drawn[args.calib :]  # the same calibration set with or without
    calibration = spec.preprocess(train_x[indices])
    model = load_model(args.model)
    if args.out:  # before any calibration: room for a save of up to the dense model's size
        check_target(args.out, args.overwrite, (REPORT_FILE,), expected_bytes=state_bytes(model))
    labels = train_y[indices] if METHODS[args.method].needs_labels else None
    settings = {"model": args.model, "dataset": dataset, "calibration_samples": args.calib, "seed": args.seed}
    if args.budget == "accuracy":
        keep = equal_accuracy_keep(model, calibration, (spec.preprocess(train_x[held_out]), train_y[held_out]),
                                   config, labels=labels, cache_dir=args.cache)
        settings.update(budget_rule="accuracy", requested_keep=config.keep, requested_compression=config.compression,
                        held_out_samples=args.held_out)
        config = dataclasses.replace(config, keep=keep, compression=None)
    score_data = (spec.preprocess(train_x), train_y) if METHODS[args.method].needs_score_data else None
    result = prune(model, calibration, config, labels=labels, score_data=score_data)
    measures = compare_models(model, result.model, test_x, test_y, spec.preprocess)
    report = build_report(result, measures, settings)
    pruned = result.model
    if args.finetune != "none":
        schedule = paper_schedule(args.model)
        if args.finetune_epochs is not None:
            schedule = dataclasses.replace(schedule, epochs=args.finetune_epochs,
                                           milestones=tuple(m for m in schedule.milestones
                                                            if m < args.finetune_epochs))
        images, targets = (train_x[indices], train_y[indices]) if args.finetune == "limited" else (train_x, train_y)
        tuned = finetune(pruned, images, targets, schedule, preprocess=spec.preprocess, seed=args.seed,
                         progress=not args.quiet)
        pruned = tuned.model
        report.update(finetune=args.finetune, finetune_samples=int(images.shape[0]),
                      finetune_schedule=dataclasses.asdict(schedule), finetune_losses=tuned.losses,
                      finetuned_accuracy=accuracy(pruned, test_x, test_y, spec.preprocess))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)
    if args.out:  # last, so that an interruption before it leaves nothing and "nothing was saved" is true
        args.out_identity = saved_identity(args.out)
        save_pruned(pruned, args.out, base_model=args.model, extra_json={REPORT_FILE: report},
                    overwrite=args.overwrite)
        args.saved_to = args.out
        if not args.json:
            console.print(f"saved the pruned model and {REPORT_FILE} to {args.out}")


def cmd_inspect(args: argparse.Namespace, console: Console) -> None:
    if args.model.startswith("hf:") and not args.arch:
        from subprune.hf.cli import cmd_inspect_transformer

        cmd_inspect_transformer(args, console)
        return
    if args.arch:
        model, title = ARCHITECTURES[args.arch](0), args.arch
        example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    elif args.model not in MODELS or args.data is not None or args.weights is not None:
        from subprune.calibration import as_calibration
        from subprune.datafiles import load_inputs
        from subprune.models.sources import parse_model
        from subprune.usercli import image_settings

        if args.data is None:
            raise ValueError(f"inspect --model {args.model} needs example inputs: pass --data PATH")
        source = parse_model(args.model, args.weights, args.model_kwargs)
        model, title = source.load(), source.name
        data = load_inputs(args.data, image_settings(args, source, model), limit=2)
        example = as_calibration(data.take(torch.arange(min(2, len(data)))), model).head(2)
    else:
        spec = get_spec(args.model)
        model, title = load_model(args.model), args.model
        images, _ = load_dataset(spec.dataset, "test")
        example = spec.preprocess(images[:2])
    sites, skipped = find_sites(model, example, coupled=args.coupled)
    table = Table(title=f"{title}: pruning sites" + (" (with coupled sites)" if args.coupled else ""))
    for column in ("site", "producers", "between", "consumers", "channels", "group size"):
        table.add_column(column)
    for s in sites:
        producers = ", ".join(p.module if p.start == 0 else f"{p.module} @{p.start}" for p in s.producers)
        zeros = (f"{z.module} ({z.side} zeros)" for z in s.zero_pads)
        between = ", ".join([*s.batchnorms, *(f"{g} (grouped)" for g in s.groupwise), *zeros]) or "-"
        consumers = ", ".join(c.module if c.start == 0 else f"{c.module} @{c.start}" for c in s.consumers)
        unit = "" if s.producers[0].span == s.channels else f" groups of {s.producers[0].span // s.channels}"
        table.add_row(s.name, producers, between, consumers, f"{s.channels}{unit}", str(s.group_size))
    console.print(table)
    coupled = [s for s in sites if s.coupled]
    for s in coupled:
        console.print(f"coupled group {s.name}: {len(s.producers)} producers "
                      f"({', '.join(p.module for p in s.producers)}) tied by {', '.join(s.coupled_by)}")
    for s in skipped:
        console.print(f"not prunable: {s.name}: {s.reason}")


def cmd_evaluate(args: argparse.Namespace, console: Console) -> None:
    if (args.model is None) == (args.directory is None):
        raise ValueError("evaluate needs a saved directory or --model hf:PATH (one of the two)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is not None or _is_transformers_directory(args.directory):
        if args.model is not None and not args.model.startswith("hf:"):
            raise ValueError(f"--model {args.model}: evaluate takes --model hf:PATH only; for a registered model "
                             "evaluate the directory that `subprune prune --out` wrote")
        from subprune.hf.cli import cmd_evaluate_transformer

        cmd_evaluate_transformer(args, console)
        return
    model = load_pruned(args.directory)
    report_path = Path(args.directory) / REPORT_FILE
    try:
        saved = json.loads(report_path.read_text()) if report_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{report_path} is not valid JSON ({exc}): the save is damaged; prune again") from exc
    if not isinstance(saved, dict) or not isinstance(saved.get("dataset", ""), str):
        raise ValueError(f"{report_path} is not a subprune report (a JSON object with a dataset name): the save is "
                         "damaged; prune again, or delete the file and pass --dataset")
    if args.data is not None or "model_source" in saved:
        if args.dataset is not None:
            raise ValueError("--dataset applies to registered models on their own dataset; this save was made with "
                             "--data: drop --dataset (or give --data PATH)")
        from subprune.usercli import evaluate_user

        evaluate_user(args.directory, model, saved, args.data, console)
        return
    name = saved.get("model") or _base_model(Path(args.directory))
    preprocess = get_spec(name).preprocess if name in MODELS else None
    own = saved.get("dataset") or (get_spec(name).dataset if name in MODELS else None)
    if args.dataset is not None and own is not None and args.dataset != own:
        raise ValueError(f"{args.directory} holds a model trained on {own}, not {args.dataset}: its accuracy on "
                         f"{args.dataset} means nothing; drop --dataset or use --dataset {own}")
    dataset = args.dataset or own
    if dataset is None:
        raise ValueError("the save names no dataset: pass --dataset")
    test_x, test_y = load_dataset(dataset, "test")
    acc = accuracy(model, test_x, test_y, preprocess)
    console.print(f"{args.directory}: {count_parameters(model):,} parameters, test accuracy {acc:.2%} on {dataset}")
    recorded = saved.get("finetuned_accuracy", saved.get("pruned_accuracy"))  # the saved model is the fine-tuned one
    if recorded is not None:
        console.print(f"accuracy recorded when it was saved: {recorded:.2%}")


def cmd_export(args: argparse.Namespace, console: Console) -> None:
    from subprune.export import export_command

    export_command(args, console)


def _base_model(directory: Path) -> str | None:
    """The registered model named in a save's architecture.json (already validated by load_pruned)."""
    return json.loads((directory / "architecture.json").read_text()).get("base_model")


def _is_transformers_directory(directory: str) -> bool:
    """A ``save_pretrained`` directory (config.json), as ``subprune prune --model hf:...`` writes."""
    return (Path(directory) / "config.json").is_file()


def cmd_list(args: argparse.Namespace, console: Console) -> None:
    for name, spec in MODELS.items():
        console.print(f"model  {name:20s} {spec.description} [{spec.dataset}]", markup=False, highlight=False)
    for form, what in (("hf:PATH", "a transformers model directory (hf:minilm: all-MiniLM-L6-v2)"),
                       ("timm:NAME", "a timm model (timm installed), e.g. timm:resnet18"),
                       ("torchvision:NAME", "a torchvision model (torchvision installed)"),
                       ("module:factory", "your own: a function or class returning the nn.Module; file.py:factory "
                                          "works too; --weights FILE loads its state dict")):
        console.print(f"model  {form:20s} {what}", markup=False, highlight=False)
    for name, method in METHODS.items():
        console.print(f"method {name:20s} {method.name}: {method.description}", markup=False, highlight=False)
    for name, method in HF_BASELINES.items():
        console.print(f"method {name:20s} {method.name}: {method.description} [hf: models]", markup=False,
                      highlight=False)


def saved_identity(directory: str | None) -> tuple[int, int] | None:
    """(device, inode) of the save now at ``directory`` (None: none): a finished save replaces it."""
    try:
        stat = current_version(directory).stat()
    except (OSError, TypeError):
        return None
    return stat.st_dev, stat.st_ino


def _interrupt_message(args: argparse.Namespace) -> str:
    """What a Ctrl-C outside the save's own handling left: read from the filesystem, not from where it struck."""
    out = getattr(args, "out", None)
    saved = getattr(args, "saved_to", None)
    if saved is None and out and hasattr(args, "out_identity") and saved_identity(out) != args.out_identity:
        saved = out  # the save had been swapped in when the interrupt came
    if saved:
        return f"interrupted after saving: {saved} holds the complete new save"
    return "interrupted: nothing was saved" + (f" ({out} is as before)" if out else "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``subprune`` command; returns the exit status."""
    args = argparse.Namespace()
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    commands = {"prune": cmd_prune, "inspect": cmd_inspect, "evaluate": cmd_evaluate, "list": cmd_list,
                "export": cmd_export}
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        console = Console(width=None if sys.stdout.isatty() else 200)  # piped: wide tables instead of 80 columns
        commands[args.command](args, console)
    except SaveInterrupted as exc:  # Ctrl-C inside the save: it says whether the save was finished or rolled back
        errors.print(str(exc), markup=False)
        return 130
    except KeyboardInterrupt:
        errors.print(_interrupt_message(args), markup=False)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        errors.print(f"error: {exc}", markup=False)
        return 2
    except Exception as exc:  # e.g. a corrupt safetensors file: still one line, no traceback
        errors.print(f"error: {type(exc).__name__}: {exc}", markup=False)
        return 2
    return 0


def entry() -> None:
    """The ``subprune`` console command: :func:`main`, then an exit that a late Ctrl-C cannot turn into a traceback."""
    code = 130
    try:
        try:
            code = main()
        finally:  # from here on Ctrl-C is ignored: the interpreter's exit (atexit hooks) cannot print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # in the few steps between main's own handler and the line above
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
