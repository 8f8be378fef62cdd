"""Accuracy side by side with Torch-Pruning 1.6.1 on the registered models, without and with fine-tuning.

Every run prunes a registered pretrained model to a whole-network parameter
compression ratio (dense / pruned), with ``--calib`` training images drawn with
the seed, and measures top-1 test accuracy, then again after the paper's
limited-data fine-tuning (the calibration images only, :func:`subprune.finetune.paper_schedule`).

* subprune: LayerInChange and AsymInChange with the refit, uniform and curve
  budgets (``PruneConfig(compression=...)``), coupled sites where the model has
  residual streams (resnet-fmnist).
* Torch-Pruning: ``MetaPruner`` with its L1 and L2 magnitude, BN-scale (models
  with BatchNorm), first-order Taylor (one backward pass of the loss on the
  calibration images) and LAMP importances, local (one ratio per layer) and
  global ranking; the classifier is ignored, as its README shows. Torch-Pruning
  takes a channel ``pruning_ratio``, not a parameter target: it is set by
  bisection to the smallest ratio whose pruned model meets the compression
  ratio, so both sides hold (at most) the same number of parameters.

Rows go to a JSON-lines file (resumable); tables of mean +- std over seeds are
written with ``--table``; ``--plot`` draws accuracy against compression.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_torch_pruning.py --models lenet \
        --out results/vs_torch_pruning.jsonl --table results/vs_torch_pruning.md --plot results/vs_torch_pruning.png
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from subprune.data import calibration_indices, load_dataset
from subprune.evaluate import accuracy, count_parameters
from subprune.finetune import finetune, paper_schedule
from subprune.models import get_spec, load_model
from subprune.pipeline import PruneConfig, prune

# method -> (subprune method, budget, interpolation_ridge); "-ir": a ridge of 0.1 at the sites whose refit has
# fewer calibration rows than twice its columns (PruneConfig.interpolation_ridge), the plain refit elsewhere
SUBPRUNE = {f"{kind}-{budget}{suffix}": (kind, budget, ridge) for suffix, ridge in (("", 0.0), ("-ir", 0.1))
            for kind in ("layer", "asym") for budget in ("uniform", "curve")}
TP_IMPORTANCES = ("l1", "l2", "bn-scale", "taylor", "lamp")
TP_METHODS = [f"tp-{imp}-{scope}" for imp in TP_IMPORTANCES for scope in ("local", "global")]
COUPLED = {"resnet-fmnist"}
_CMD = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_torch_pruning.py"
_IR = "--methods layer-uniform-ir layer-curve-ir asym-uniform-ir asym-curve-ir"
_REST = "--test-subset 2000 --out results/vs_torch_pruning.jsonl"
RUNS = [  # in the order they ran; each resumes (skips the rows it has), so rerunning them completes the table
    f"{_CMD} --models lenet --out results/vs_torch_pruning.jsonl",
    f"{_CMD} --models advertorch-lenet5 ccexam-mnistnet {_REST}  # first 1 or 3 seeds, an earlier --seeds order",
    f"{_CMD} --models advertorch-lenet5 ccexam-mnistnet vgg11-bn-fmnist resnet-fmnist --seed-values 0 {_REST}",
    f"{_CMD} --models ccexam-mnistnet {_IR} --seed-values 0 1 2 {_REST}",
    f"{_CMD} --models ccexam-mnistnet --seed-values 1 2 {_REST}",
    f"{_CMD} --models vgg11-bn-fmnist advertorch-lenet5 resnet-fmnist --seed-values 1 2 {_REST}",
    f"{_CMD} --models advertorch-lenet5 vgg11-bn-fmnist {_IR} --seed-values 0 1 2 {_REST}",
]
NOTES = """512 calibration images per seed (the seed draws them; they are also the fine-tuning set). LeNet on all
10,000 MNIST test images; the other models on the first 2,000 test images of their data set (MNIST or
Fashion-MNIST), to fit the runs in a 2-core session. Torch-Pruning's `pruning_ratio` is bisected to the smallest
ratio that meets the compression ratio (its discrete steps often overshoot: the achieved ratio is in brackets);
its L1, L2, BN-scale and LAMP importances read only the weights, so their pruned model is the same for every
seed (std 0 without fine-tuning). BN-scale needs BatchNorm, which the MNIST models lack. Fine-tuning: the
paper's limited-data schedule on the 512 calibration images, the same for every method
(`subprune.finetune.paper_schedule`: Adam lr 1e-3, 10 epochs for LeNet; 20 with weight decay 5e-4 and the
rate x0.1 at epochs 10 and 15 otherwise). `-ir`: the same subprune method with `PruneConfig(interpolation_ridge=0.1)`
(a ridge only at the sites whose refit has fewer rows than twice its columns; docs/zoo.md). resnet-fmnist is pruned
with `coupled=True` (its residual streams)."""


def _importance(tp, name: str):
    return {"l1": lambda: tp.importance.MagnitudeImportance(p=1), "l2": lambda: tp.importance.MagnitudeImportance(p=2),
            "bn-scale": lambda: tp.importance.BNScaleImportance(), "taylor": lambda: tp.importance.TaylorImportance(),
            "lamp": lambda: tp.importance.LAMPImportance(p=2)}[name]()


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def tp_prune(model: nn.Module, calibration: torch.Tensor, labels: torch.Tensor, importance: str, scope: str,
             ratio: float) -> nn.Module:
    """A Torch-Pruning copy of ``model`` at channel ``pruning_ratio`` ``ratio``."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, calibration[:2], importance=_importance(tp, importance),
                                      global_pruning=scope == "global", pruning_ratio=ratio,
                                      ignored_layers=[_classifier(model)])
        if importance == "taylor":  # gradients of the loss on the calibration images, as its examples do
            model.zero_grad()
            for start in range(0, len(calibration), 128):
                F.cross_entropy(model(calibration[start : start + 128]), labels[start : start + 128],
                                reduction="sum").backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def tp_at_compression(model, calibration, labels, importance, scope, target) -> tuple[nn.Module, float]:
    """The smallest pruning ratio (to 1e-3) whose pruned model has at most dense / target parameters."""
    dense = count_parameters(model)
    low, high, best = 0.0, 0.999, None
    for _ in range(12):
        mid = (low + high) / 2
        pruned = tp_prune(model, calibration, labels, importance, scope, mid)
        if dense / count_parameters(pruned) >= target:
            high, best = mid, (pruned, mid)
        else:
            low = mid
    if best is None:
        pruned = tp_prune(model, calibration, labels, importance, scope, high)
        best = (pruned, high)
    return best


# Torch-Pruning importances that read only the weights: the pruned model is the same for every seed (the
# seed still draws the fine-tuning images), so it is pruned once per (model, method, target) and reused.
SEED_FREE = ("tp-l1-", "tp-l2-", "tp-bn-scale-", "tp-lamp-")
_PRUNED_CACHE: dict[tuple, tuple[nn.Module, float, float]] = {}


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer of ``model``, names and shapes included.

    Two rows with the same fingerprint hold the same pruned model, bit for bit: the
    seed-free Torch-Pruning rows record it, so the table can show that their pruned
    model does not depend on the seed (only the fine-tuning images do).
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_one(name: str, method: str, target: float, seed: int, data, args) -> dict:
    spec, train_x, train_y, test_x, test_y, dense, dense_accuracy = data
    indices = calibration_indices(train_x.shape[0], args.calib, seed)
    calibration, labels = spec.preprocess(train_x[indices]), train_y[indices]
    row = {"model": name, "method": method, "compression_target": target, "seed": seed, "calib": args.calib,
           "test_subset": args.test_subset, "finetune": args.finetune, "dense_accuracy": dense_accuracy}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        if method in SUBPRUNE:
            kind, budget, ridge = SUBPRUNE[method]
            config = PruneConfig(method=kind, compression=target, budget=budget, seed=seed, progress=False,
                                 coupled=name in COUPLED, interpolation_ridge=ridge)
            model = prune(dense, calibration, config).model
        else:
            _, importance, scope = method.split("-", 2) if not method.startswith("tp-bn-scale") else (
                "tp", "bn-scale", method.rsplit("-", 1)[1])
            if importance == "bn-scale" and not any(isinstance(m, nn.BatchNorm2d) for m in dense.modules()):
                row["status"] = "no BatchNorm"
                return row
            cached = _PRUNED_CACHE.get((name, method, target)) if method.startswith(SEED_FREE) else None
            if cached is None:
                model, ratio = tp_at_compression(dense, calibration, labels, importance, scope, target)
                cached = (model, ratio, time.perf_counter() - start)
                if method.startswith(SEED_FREE):
                    _PRUNED_CACHE[(name, method, target)] = cached
            else:
                row["pruned_once"] = True  # the model of the first seed this process ran: prune time is that run's
            model, row["tp_pruning_ratio"], seconds = cached
    except Exception as exc:  # recorded, never hidden
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    row["prune_seconds"] = seconds if row.get("pruned_once") else time.perf_counter() - start
    row["prune_cpu_seconds"] = time.process_time() - cpu
    row["compression_ratio"] = count_parameters(dense) / count_parameters(model)
    row["weights_sha"] = weights_fingerprint(model)
    try:
        row["pruned_accuracy"] = accuracy(model, test_x, test_y, spec.preprocess)
        row["status"] = "ok"
    except Exception as exc:
        row["status"] = f"pruned model fails: {type(exc).__name__}"
        return row
    if args.finetune == "limited":
        start, cpu = time.perf_counter(), time.process_time()
        tuned = finetune(model, train_x[indices], train_y[indices], paper_schedule(name),
                         preprocess=spec.preprocess, seed=seed, progress=False)
        row["finetune_seconds"] = time.perf_counter() - start
        row["finetune_cpu_seconds"] = time.process_time() - cpu
        row["finetuned_accuracy"] = accuracy(tuned.model, test_x, test_y, spec.preprocess)
    return row


def load_data(name: str, test_subset: int | None) -> tuple:
    """The model's spec, train and (first ``test_subset``) test tensors, dense model and its test accuracy."""
    spec = get_spec(name)
    train_x, train_y = load_dataset(spec.dataset, "train")
    test_x, test_y = load_dataset(spec.dataset, "test")
    if test_subset:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    dense = load_model(name).eval()
    return spec, train_x, train_y, test_x, test_y, dense, accuracy(dense, test_x, test_y, spec.preprocess)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(row: dict) -> tuple:
    return row["model"], row["method"], row["compression_target"], row["seed"], row["calib"], row["test_subset"], \
        row["finetune"]


def table(rows: list[dict], metric: str) -> str:
    targets = sorted({r["compression_target"] for r in rows})
    lines = ["| model | method | " + " | ".join(f"x{t:g}" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    order = list(SUBPRUNE) + TP_METHODS
    for model in sorted({r["model"] for r in rows}):
        dense = [r for r in rows if r["model"] == model and r.get("dense_accuracy") is not None]
        if dense:
            subset = dense[0]["test_subset"]
            lines.append(f"| {model} | dense, {f'first {subset:,}' if subset else 'all'} test images | "
                         + " | ".join(f"{100 * dense[0]['dense_accuracy']:.2f}" for _ in targets) + " |")
        for method in [m for m in order if any(r["method"] == m and r["model"] == model for r in rows)]:
            cells = []
            for t in targets:
                sel = [r for r in rows if (r["model"], r["method"], r["compression_target"]) == (model, method, t)]
                ok = [r for r in sel if r.get(metric) is not None]
                if not ok:
                    cells.append(sel[0]["status"][:40] if sel else "-")
                    continue
                acc = [100 * r[metric] for r in ok]
                std = statistics.stdev(acc) if len(acc) > 1 else 0.0
                ratio = statistics.mean(r["compression_ratio"] for r in ok)
                cells.append(f"{statistics.mean(acc):.2f} ± {std:.2f} (x{ratio:.1f}, n={len(ok)})")
            lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_worst(rows: list[dict], metric: str) -> str:
    """Per model and side (subprune, subprune ``-ir``, Torch-Pruning): the best method's mean and the worst's."""
    targets = sorted({r["compression_target"] for r in rows})
    sides = [("subprune", lambda m: m in SUBPRUNE and not m.endswith("-ir")),
             ("subprune -ir", lambda m: m.endswith("-ir")), ("Torch-Pruning", lambda m: m in TP_METHODS)]
    lines = ["| model | side | " + " | ".join(f"x{t:g}" for t in targets) + " |", "|---|---|" + "---|" * len(targets)]
    for model in sorted({r["model"] for r in rows}):
        for side, member in sides:
            cells = []
            for t in targets:
                means = {}
                for method in {r["method"] for r in rows if r["model"] == model and member(r["method"])}:
                    acc = [100 * r[metric] for r in rows if (r["model"], r["method"], r["compression_target"])
                           == (model, method, t) and r.get(metric) is not None]
                    if acc:
                        means[method] = (statistics.mean(acc), len(acc))
                if not means:
                    cells.append("")
                    continue
                best = max(means, key=lambda m: means[m][0])
                cells.append(f"{means[best][0]:.1f} ({best.removeprefix('tp-')}, n={means[best][1]}); "
                             f"worst {min(v for v, _ in means.values()):.1f}")
            if any(cells):
                lines.append(f"| {model} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ridge_table(rows: list[dict], metric: str) -> str:
    """Each subprune method without and with the ``-ir`` ridge, per model that has ``-ir`` rows: mean over seeds."""
    targets = sorted({r["compression_target"] for r in rows})
    lines = ["| model | method | " + " | ".join(f"x{t:g}" for t in targets) + " |", "|---|---|" + "---|" * len(targets)]

    def mean(model, method, t):
        acc = [100 * r[metric] for r in rows if (r["model"], r["method"], r["compression_target"]) == (model, method, t)
               and r.get(metric) is not None]
        return (statistics.mean(acc), len(acc)) if acc else None

    for model in sorted({r["model"] for r in rows if r["method"].endswith("-ir")}):
        for method in [m for m in SUBPRUNE if not m.endswith("-ir")]:
            cells = []
            for t in targets:
                plain, ridge = mean(model, method, t), mean(model, f"{method}-ir", t)
                cells.append(f"{plain[0]:.2f} -> {ridge[0]:.2f} (n={plain[1]}, {ridge[1]})" if plain and ridge else "")
            lines.append(f"| {model} | {method} -> {method}-ir | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_free_note(rows: list[dict]) -> str:
    """What the rows show about the seed-free Torch-Pruning methods: the same pruned model for every seed.

    Checks the recorded ``weights_sha`` fingerprints (rows since they were added) and the accuracies
    without fine-tuning (every row), per (model, method, target) cell.
    """
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"].startswith(SEED_FREE) and r.get("pruned_accuracy") is not None:
            cells.setdefault((r["model"], r["method"], r["compression_target"]), []).append(r)
    multi = {k: v for k, v in cells.items() if len({r["seed"] for r in v}) > 1}
    fingerprinted = {k: {r["weights_sha"] for r in v if r.get("weights_sha")} for k, v in multi.items()}
    checked = {k: f for k, f in fingerprinted.items() if sum(1 for r in multi[k] if r.get("weights_sha")) > 1}
    same_sha = sum(len(f) == 1 for f in checked.values())
    same_acc = sum(len({r["pruned_accuracy"] for r in v}) == 1 for v in multi.values())
    return (f"Seed-free Torch-Pruning cells (L1, L2, BN-scale, LAMP) with more than one seed: {len(multi)}; the "
            f"pruned model's accuracy without fine-tuning is the same on every seed in {same_acc} of them, and in "
            f"the {len(checked)} cells with two or more rows that record a weights fingerprint (SHA-256 of the "
            f"pruned state dict, `weights_sha`, recorded by the rows run since stop 18) the fingerprints are "
            f"identical in {same_sha}. Each seed's row prunes anew (or, within one process, reuses the model its first "
            f"seed pruned: `pruned_once`); no number is copied between seeds.")


def n_note(rows: list[dict]) -> str:
    """Which cells have fewer than 3 seeds, per model (from the rows themselves)."""
    counts: dict[tuple, set] = {}
    for r in rows:
        if r.get("pruned_accuracy") is not None:
            counts.setdefault((r["model"], r["method"]), set()).add((r["compression_target"], r["seed"]))
    parts = []
    for model in sorted({m for m, _ in counts}):
        short = {}
        for (m, method), got in counts.items():
            if m != model:
                continue
            per_target: dict[float, int] = {}
            for target, _ in got:
                per_target[target] = per_target.get(target, 0) + 1
            low = min(per_target.values())
            if low < 3:
                short.setdefault(low, []).append(method)
        if short:
            parts.append(f"{model}: " + "; ".join(f"n={n} for {', '.join(sorted(ms))}"
                                                  for n, ms in sorted(short.items())))
    return ("Cells with fewer than 3 seeds (the lowest n over the ratios): " + ". ".join(parts) + "."
            if parts else "Every cell has 3 seeds.")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    metrics = [("pruned_accuracy", "no fine-tuning"), ("finetuned_accuracy", "after limited-data fine-tuning")]
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 8), squeeze=False)
    for row_axes, (metric, label) in zip(axes, metrics, strict=True):
        for ax, model in zip(row_axes, models, strict=True):
            for method in list(SUBPRUNE) + TP_METHODS:
                points = {}
                for r in rows:
                    if r["model"] == model and r["method"] == method and r.get(metric) is not None:
                        points.setdefault(r["compression_target"], []).append(100 * r[metric])
                if points:
                    xs = sorted(points)
                    style = "-o" if method in SUBPRUNE else "--x"
                    ax.plot(xs, [statistics.mean(points[x]) for x in xs], style, label=method,
                            linewidth=2.2 if method in SUBPRUNE else 1.0)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("compression ratio (whole-network parameters)")
            ax.set_ylabel(f"top-1 test accuracy (%), {label}", fontsize=8)
            ax.set_title(model)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet", "advertorch-lenet5", "ccexam-mnistnet"])
    parser.add_argument("--methods", nargs="+", default=[m for m in SUBPRUNE if not m.endswith("-ir")] + TP_METHODS)
    parser.add_argument("--compressions", nargs="+", type=float, default=[2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--seed-values", type=int, nargs="+", default=None, help="these seeds instead of --seeds")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--finetune", choices=["none", "limited"], default="limited")
    parser.add_argument("--test-subset", type=int, default=None, help="the first N test images")
    parser.add_argument("--out", default="results/vs_torch_pruning.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows = read_rows(out)
    if not args.table_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = {key(r) for r in rows}
        data = {}
        # seed-major order: an interrupted run leaves every (model, method, target) cell with the same seeds
        for seed in args.seed_values if args.seed_values is not None else range(args.seeds):
            for name in args.models:
                for method in args.methods:
                    for target in args.compressions:
                        probe = {"model": name, "method": method, "compression_target": target, "seed": seed,
                                 "calib": args.calib, "test_subset": args.test_subset, "finetune": args.finetune}
                        if key(probe) in done:
                            continue
                        if name not in data:
                            data[name] = load_data(name, args.test_subset)
                        row = run_one(name, method, target, seed, data[name], args)
                        print(json.dumps(row), flush=True)
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        rows.append(row)
    text = "### Without fine-tuning\n\n" + table(rows, "pruned_accuracy")
    if any(r.get("finetuned_accuracy") is not None for r in rows):
        text += "\n\n### After limited-data fine-tuning (the calibration images, paper schedule)\n\n" + table(
            rows, "finetuned_accuracy")
    text += ("\n\n### Best (and worst) method of each side, no fine-tuning (mean over seeds; n = seeds of the best)\n\n"
             + best_worst(rows, "pruned_accuracy"))
    if any(r.get("finetuned_accuracy") is not None for r in rows):
        text += ("\n\n### Best (and worst) method of each side, after limited-data fine-tuning\n\n"
                 + best_worst(rows, "finetuned_accuracy"))
    if any(r["method"].endswith("-ir") for r in rows):
        text += ("\n\n### The plain refit against `-ir` (the ridge at interpolating sites), no fine-tuning\n\n"
                 + ridge_table(rows, "pruned_accuracy"))
        if any(r.get("finetuned_accuracy") is not None for r in rows):
            text += "\n\n### The plain refit against `-ir`, after limited-data fine-tuning\n\n" + ridge_table(
                rows, "finetuned_accuracy")
    print(text)
    if args.table:
        command = shlex.join(["OMP_NUM_THREADS=1", ".venv/bin/python", "benchmarks/vs_torch_pruning.py",
                              *sys.argv[1:]])
        runs = "\n".join(RUNS)
        Path(args.table).write_text(
            f"# subprune vs Torch-Pruning 1.6.1\n\nTable and plot: `{command}`, from the rows of these runs (each "
            f"resumes, skipping the rows it has):\n\n```bash\n{runs}\n```\n\n{NOTES}\n\n{seed_free_note(rows)}\n\n"
            f"{n_note(rows)}\n\nTop-1 test accuracy (%), "
            "mean ± std over seeds (achieved compression, runs).\n\n" + text + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
