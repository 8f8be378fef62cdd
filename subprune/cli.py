"""The ``subprune`` command line: a thin layer over the library (argparse).

    subprune prune --model lenet --dataset mnist --method asym --keep 0.25 --calib 512 --seed 0 --out DIR
    subprune inspect --model lenet
    subprune evaluate DIR
    subprune list
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from subprune.data import DATASETS, calibration_indices, load_dataset
from subprune.evaluate import accuracy, count_parameters
from subprune.methods import METHODS
from subprune.models import MODELS, get_spec, load_model
from subprune.pipeline import MIN_CALIBRATION_SAMPLES, PruneConfig, prune
from subprune.report import build_report, compare_models, print_report
from subprune.serialization import ARCHITECTURE_FILE, load_pruned, save_pruned
from subprune.sites import find_sites

REPORT_FILE = "report.json"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"keep ratio {text!r} is not a number") from exc
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"keep ratio {value} is out of range: it must be in (0, 1]")
    return value


def _site_ratio(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--keep-site expects NAME=RATIO, got {text!r}")
    return name, _ratio(value)


def _model_name(text: str) -> str:
    if text in MODELS or (text.startswith("hf:") and len(text) > 3):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}: choose one of {', '.join(sorted(MODELS))} "
                                     "or hf:PATH (a transformers model directory; hf:minilm for all-MiniLM-L6-v2)")


def _dataset_name(text: str) -> str:
    if text in DATASETS or text == "text:wikipedia":
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}: choose one of {', '.join(sorted(DATASETS))} "
                                     "or text:wikipedia (for hf: models)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subprune",
        description="Data-efficient structured pruning (El Halabi et al., NeurIPS 2022).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a pretrained model with unlabeled calibration samples")
    p.add_argument("--model", default="lenet", type=_model_name,
                   help=f"registered pretrained model ({', '.join(sorted(MODELS))}) or hf:PATH (transformers)")
    p.add_argument("--dataset", default=None, type=_dataset_name,
                   help="calibration (train split) and test data; default: the model's own (text:wikipedia for hf:)")
    p.add_argument("--method", default="asym", choices=sorted(METHODS),
                   help="layer=LayerInChange, seq=SeqInChange, asym=AsymInChange (default)")
    p.add_argument("--keep", type=_ratio, default=0.5, help="keep ratio of every site, in (0, 1]")
    p.add_argument("--heads", type=_ratio, default=None, help="hf: models: keep ratio of attention heads")
    p.add_argument("--ffn", type=_ratio, default=None, help="hf: models: keep ratio of FFN neurons")
    p.add_argument("--keep-site", type=_site_ratio, action="append", metavar="NAME=RATIO",
                   help="per-site keep ratio (repeatable); sites not named are not pruned")
    p.add_argument("--layers", default=None, help="comma-separated producer layers to prune (default: all)")
    p.add_argument("--no-reweight", action="store_true", help="do not refit the consumer weights")
    p.add_argument("--calib", type=int, default=512, help="number of calibration samples (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and stochastic greedy")
    p.add_argument("--epsilon", type=float, default=0.0, help="stochastic greedy epsilon in [0, 1)")
    p.add_argument("--ridge", type=float, default=0.0, help="relative ridge (times mean diag of G)")
    p.add_argument("--batch-size", type=int, default=128, help="calibration batch size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="directory for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-subprune --out directory")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("inspect", help="list a model's pruning sites and the layers that cannot be pruned")
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))

    p = sub.add_parser("evaluate", help="reload a saved pruned model and measure its test accuracy")
    p.add_argument("directory")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS))

    sub.add_parser("list", help="list the registered models and methods")
    return parser


def _check_out(directory: str | None, overwrite: bool) -> None:
    if directory is None:
        return
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / ARCHITECTURE_FILE).exists() and not overwrite:
        raise ValueError(f"--out {path} is a non-empty directory not written by subprune; "
                         "choose another path or pass --overwrite")


def cmd_prune(args: argparse.Namespace, console: Console) -> None:
    _check_out(args.out, args.overwrite)
    if args.model.startswith("hf:"):
        from subprune.hf.cli import cmd_prune_transformer

        cmd_prune_transformer(args, console)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_spec(args.model)
    dataset = args.dataset or spec.dataset
    train_x, _ = load_dataset(dataset, "train")
    test_x, test_y = load_dataset(dataset, "test")
    if not MIN_CALIBRATION_SAMPLES <= args.calib <= train_x.shape[0]:
        raise ValueError(f"--calib {args.calib} must be between {MIN_CALIBRATION_SAMPLES} and the "
                         f"{train_x.shape[0]} training samples of {dataset}")
    calibration = spec.preprocess(train_x[calibration_indices(train_x.shape[0], args.calib, args.seed)])
    keep = dict(args.keep_site) if args.keep_site else args.keep
    config = PruneConfig(
        method=args.method, keep=keep, reweight=not args.no_reweight,
        layers=tuple(s.strip() for s in args.layers.split(",")) if args.layers else None,
        epsilon=args.epsilon, ridge=args.ridge, batch_size=args.batch_size, seed=args.seed,
        progress=not args.quiet,
    )
    model = load_model(args.model)
    result = prune(model, calibration, config)
    measures = compare_models(model, result.model, test_x, test_y, spec.preprocess)
    settings = {"model": args.model, "dataset": dataset, "calibration_samples": args.calib, "seed": args.seed}
    report = build_report(result, measures, settings)
    if args.out:
        save_pruned(result.model, args.out, base_model=args.model, extra_json={REPORT_FILE: report})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)
        if args.out:
            console.print(f"saved the pruned model and {REPORT_FILE} to {args.out}")


def cmd_inspect(args: argparse.Namespace, console: Console) -> None:
    spec = get_spec(args.model)
    model = load_model(args.model)
    images, _ = load_dataset(spec.dataset, "test")
    sites, skipped = find_sites(model, spec.preprocess(images[:2]))
    table = Table(title=f"{args.model}: pruning sites")
    for column in ("site (producer)", "between", "consumer", "channels", "group size"):
        table.add_column(column)
    for s in sites:
        table.add_row(s.name, ", ".join(s.batchnorms) or "-", s.consumer, str(s.channels), str(s.group_size))
    console.print(table)
    for s in skipped:
        console.print(f"not prunable: {s.name}: {s.reason}")


def cmd_evaluate(args: argparse.Namespace, console: Console) -> None:
    model = load_pruned(args.directory)
    report_path = Path(args.directory) / REPORT_FILE
    saved = json.loads(report_path.read_text()) if report_path.exists() else {}
    name = saved.get("model")
    preprocess = get_spec(name).preprocess if name in MODELS else None
    dataset = args.dataset or saved.get("dataset") or (get_spec(name).dataset if name in MODELS else None)
    if dataset is None:
        raise ValueError("the save names no dataset: pass --dataset")
    test_x, test_y = load_dataset(dataset, "test")
    acc = accuracy(model, test_x, test_y, preprocess)
    console.print(f"{args.directory}: {count_parameters(model):,} parameters, test accuracy {acc:.2%} on {dataset}")
    if "pruned_accuracy" in saved:
        console.print(f"accuracy recorded when it was saved: {saved['pruned_accuracy']:.2%}")


def cmd_list(args: argparse.Namespace, console: Console) -> None:
    for name, spec in MODELS.items():
        console.print(f"model  {name:20s} {spec.description} [{spec.dataset}]")
    for name, method in METHODS.items():
        console.print(f"method {name:20s} {method.name}: {method.description}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``subprune`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    commands = {"prune": cmd_prune, "inspect": cmd_inspect, "evaluate": cmd_evaluate, "list": cmd_list}
    try:
        commands[args.command](args, console)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
