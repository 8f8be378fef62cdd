"""Accuracy of the InChange methods and the baselines on the registered models, without and with fine-tuning.

For every model x method x reweighting x target x seed: draw ``--calib``
training images with the seed (their labels are used only by the methods that
need them: ActGrad), prune every site to the target (a keep ratio per site, or
with ``--targets compression`` a compression ratio of whole-network parameters),
measure top-1 accuracy on the model's test set (the first ``--test-subset``
images if given) and the achieved compression ratio. With ``--finetune limited``
(the calibration images only) or ``full`` (the whole training split) the pruned
model is then fine-tuned with the paper's schedule (:func:`subprune.finetune.paper_schedule`) and the row records both
``pruned_accuracy`` (no fine-tuning) and ``finetuned_accuracy``. Rows are
appended to a JSON-lines file (one per run, all settings and metrics); finished
runs are skipped when the command is run again. At the end markdown tables of
mean and std over seeds are printed (and written next to the results with
``--table``); ``benchmarks/plot_sweep.py`` draws the results.

    .venv/bin/python benchmarks/accuracy_sweep.py --out results/core_sweep.jsonl --table results/core_sweep.md
    .venv/bin/python benchmarks/accuracy_sweep.py --models lenet --targets compression --seeds 3 \
        --out results/baselines_lenet.jsonl --table results/baselines_lenet.md
    .venv/bin/python benchmarks/accuracy_sweep.py --models lenet --targets compression --compressions 4 16 64 \
        --methods asym layer weightnorm random --seeds 3 --finetune limited \
        --out results/finetune_lenet.jsonl --table results/finetune_lenet.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from subprune.data import calibration_indices, load_dataset
from subprune.evaluate import accuracy, count_parameters
from subprune.finetune import finetune, paper_schedule
from subprune.methods import METHODS
from subprune.models import MODELS, get_spec, load_model
from subprune.pipeline import PruneConfig, prune

METHOD_NAMES = {key: m.name for key, m in METHODS.items()}


def target_of(row: dict) -> tuple[str, float]:
    """("keep", ratio) or ("compression", ratio); rows written before targets existed are keep ratios."""
    return (row.get("target", "keep"), row["compression_target"] if row.get("target") == "compression" else row["keep"])


def run_key(row: dict) -> tuple:
    return (row["model"], row["method"], row["reweight"], target_of(row), row.get("budget", "uniform"),
            row["seed"], row["calib"], row.get("ridge", 0.0), row.get("finetune", "none"),
            row.get("finetune_epochs"), row.get("test_subset"))


def finetune_epochs(args: argparse.Namespace, model: str) -> int | None:
    """Epochs of the fine-tuning of ``model`` in this sweep (None without fine-tuning)."""
    if args.finetune == "none":
        return None
    return args.finetune_epochs or paper_schedule(model).epochs


def schedule_of(args: argparse.Namespace, model: str):
    """The paper's schedule for ``model``, with ``--finetune-epochs`` (milestones beyond it dropped)."""
    schedule, epochs = paper_schedule(model), finetune_epochs(args, model)
    milestones = tuple(m for m in schedule.milestones if m < epochs)
    return dataclasses.replace(schedule, epochs=epochs, milestones=milestones)


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of a results file; a last line cut short by an interrupted run is dropped (and, with
    ``repair``, removed from the file so that new rows are appended after the last complete one)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise SystemExit(f"{path}: line {number + 1} is not JSON; fix or remove it, then resume") from None
            print(f"{path}: dropping the incomplete last line (an interrupted run); it will be redone")
            if repair:
                path.write_text("".join(lines[:-1]))
            return rows
    if repair and lines and not lines[-1].endswith("\n"):
        path.write_text("".join(lines) + "\n")
    return rows


def sweep(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out, repair=True)
    done = {run_key(r) for r in rows}
    values = args.keeps if args.targets == "keep" else args.compressions
    reweights = {"both": (True, False), "yes": (True,), "no": (False,)}[args.reweight]
    plan = [
        (model, method, reweight, value, seed)
        for model in args.models
        for method in args.methods
        for reweight in reweights
        for value in values
        for seed in range(args.seeds)
        if (model, method, reweight, (args.targets, value), args.budget, seed, args.calib, args.ridge,
            args.finetune, finetune_epochs(args, model), args.test_subset) not in done
        and not (args.budget != "uniform" and METHODS[method].global_ranking)  # they rank globally instead
    ]
    cache: dict[str, tuple] = {}
    for model_name, method, reweight, value, seed in tqdm(plan, desc="sweep"):
        if model_name not in cache:
            spec = get_spec(model_name)
            train_x, train_y = load_dataset(spec.dataset, "train")
            test_x, test_y = load_dataset(spec.dataset, "test")
            if args.test_subset:
                test_x, test_y = test_x[: args.test_subset], test_y[: args.test_subset]
            dense = load_model(model_name)
            dense_acc = accuracy(dense, test_x, test_y, spec.preprocess)
            cache[model_name] = (spec, train_x, train_y, test_x, test_y, dense, dense_acc)
        spec, train_x, train_y, test_x, test_y, dense, dense_acc = cache[model_name]
        indices = calibration_indices(train_x.shape[0], args.calib, seed)
        calibration = spec.preprocess(train_x[indices])
        labels = train_y[indices] if METHODS[method].needs_labels else None
        keep, compression = (value, None) if args.targets == "keep" else (None, value)
        config = PruneConfig(method=method, keep=keep, compression=compression, budget=args.budget,
                             reweight=reweight, seed=seed, ridge=args.ridge, progress=False)
        score_data = (spec.preprocess(train_x), train_y) if METHODS[method].needs_score_data else None
        start = time.perf_counter()
        result = prune(dense, calibration, config, labels=labels, score_data=score_data)
        seconds = time.perf_counter() - start
        row = {
            "model": model_name, "method": method, "reweight": reweight, "target": args.targets,
            "keep": keep, "compression_target": compression, "budget": args.budget, "seed": seed,
            "calib": args.calib, "ridge": args.ridge, "test_subset": args.test_subset, "dense_accuracy": dense_acc,
            "pruned_accuracy": accuracy(result.model, test_x, test_y, spec.preprocess),
            "dense_params": count_parameters(dense), "pruned_params": count_parameters(result.model),
            "prune_seconds": seconds, "objectives": [s.objective for s in result.sites],
            "kept": [s.kept for s in result.sites],
        }
        row["compression_ratio"] = row["dense_params"] / row["pruned_params"]
        if args.finetune != "none":
            images, targets = ((train_x[indices], train_y[indices]) if args.finetune == "limited"
                               else (train_x, train_y))
            start = time.perf_counter()
            tuned = finetune(result.model, images, targets, schedule_of(args, model_name),
                             preprocess=spec.preprocess, seed=seed, progress=False)
            row.update(finetune=args.finetune, finetune_epochs=finetune_epochs(args, model_name),
                       finetune_samples=int(images.shape[0]), finetune_seconds=time.perf_counter() - start,
                       finetune_losses=tuned.losses,
                       finetuned_accuracy=accuracy(tuned.model, test_x, test_y, spec.preprocess))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def table(rows: list[dict], calib: int, budget: str = "uniform", metric: str = "pruned_accuracy",
          finetune: str = "none", test_subset: int | None = None) -> str:
    """Markdown: one line per model x method x reweight, columns = targets (mean +- std % over seeds).

    ``metric`` is "pruned_accuracy" (no fine-tuning) or "finetuned_accuracy"; only
    rows of the fine-tuning mode ``finetune``, this ``calib``, ``budget`` and
    ``test_subset`` (None: the whole test set) are used.
    """
    rows = [r for r in rows if r["calib"] == calib and r.get("budget", "uniform") == budget
            and r.get("finetune", "none") == finetune and r.get("test_subset") == test_subset]
    targets = sorted({target_of(r) for r in rows}, key=lambda t: (t[0], -t[1] if t[0] == "keep" else t[1]))
    heads = [f"keep {v}" if kind == "keep" else f"x{v:g}" for kind, v in targets]
    lines = [f"Test accuracy on the first {test_subset} test images of each dataset.", ""] if test_subset else []
    lines += [
        "| model | method | reweight | " + " | ".join(heads) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    groups = sorted({(r["model"], r["method"], r["reweight"]) for r in rows},
                    key=lambda g: (g[0], list(METHOD_NAMES).index(g[1]), not g[2]))
    for model, method, reweight in groups:
        cells = []
        for t in targets:
            sel = [r for r in rows if run_key(r)[:4] == (model, method, reweight, t)]
            if not sel:
                cells.append("-")
                continue
            acc = [100 * r[metric] for r in sel]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            ratio = statistics.mean(r["compression_ratio"] for r in sel)
            cells.append(f"{statistics.mean(acc):.2f} ± {std:.2f} (x{ratio:.1f}, n={len(sel)})")
        label = f"| {model} | {METHOD_NAMES[method]} | {'yes' if reweight else 'no'} | "
        lines.append(label + " | ".join(cells) + " |")
    dense = {r["model"]: r["dense_accuracy"] for r in rows}
    timing = {}
    for r in rows:
        timing.setdefault(r["model"], []).append(r["prune_seconds"] + r.get("finetune_seconds", 0.0))
    lines.append("")
    for model in sorted(dense):
        what = "pruning and fine-tuning" if finetune != "none" else "pruning"
        lines.append(f"- {model}: dense accuracy {100 * dense[model]:.2f}%, {what} wall-clock median "
                     f"{statistics.median(timing[model]):.2f} s (max {max(timing[model]):.2f} s) per run")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet", "advertorch-lenet5", "ccexam-mnistnet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", choices=["keep", "compression"], default="keep",
                        help="sweep keep ratios per site (--keeps) or whole-network compression ratios")
    parser.add_argument("--keeps", nargs="+", type=float, default=None, help="default 0.75 0.5 0.25 0.1")
    parser.add_argument("--compressions", nargs="+", type=float, default=None, help="default 2 4 8 16 32 64")
    parser.add_argument("--budget", choices=["uniform", "curve"], default="uniform",
                        help="per-site budget of the Layer methods (global baselines rank channels themselves)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--ridge", type=float, default=0.0, help="relative ridge of the solver and refit")
    parser.add_argument("--reweight", choices=["both", "yes", "no"], default="both",
                        help="runs with and/or without the least-squares refit of the consumers")
    parser.add_argument("--finetune", choices=["none", "limited", "full"], default="none",
                        help="also fine-tune each pruned model (paper schedule) on the calibration images "
                             "(limited) or the whole training split (full) and record finetuned_accuracy")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="override the schedule's epochs (paper: 10 for lenet, 20 otherwise)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="evaluate on the first N test images only (quick checks; recorded in the row)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/core_sweep.jsonl")
    parser.add_argument("--table", default=None, help="also write the markdown table here")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: only tabulate the rows already in --out (all models in it)")
    args = parser.parse_args()
    if args.test_subset is not None and args.test_subset < 1:
        parser.error("--test-subset must be >= 1")
    if args.compressions is not None and args.targets != "compression":
        parser.error("--compressions needs --targets compression (the default target is keep ratios, --keeps)")
    if args.keeps is not None and args.targets != "keep":
        parser.error("--keeps applies to --targets keep only; use --compressions with --targets compression")
    args.keeps = args.keeps or [0.75, 0.5, 0.25, 0.1]
    args.compressions = args.compressions or [2, 4, 8, 16, 32, 64]
    if any(c < 1 for c in args.compressions) or any(not 0 < k <= 1 for k in args.keeps):
        parser.error("--compressions must be >= 1 and --keeps in (0, 1]")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; available: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    if args.table_only:
        if not Path(args.out).is_file():
            parser.error(f"--out {args.out} does not exist: --table-only tabulates an existing results file")
        rows = read_rows(Path(args.out))
    else:
        rows = sweep(args)
    text = table(rows, args.calib, args.budget, finetune=args.finetune, test_subset=args.test_subset)
    if args.finetune != "none":
        text = ("### Without fine-tuning\n\n" + text + f"\n\n### After fine-tuning ({args.finetune} data)\n\n"
                + table(rows, args.calib, args.budget, "finetuned_accuracy", args.finetune, args.test_subset))
    print(text)
    if args.table:
        command = shlex.join(["python", "benchmarks/accuracy_sweep.py", *sys.argv[1:]])
        Path(args.table).write_text(f"Command: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
