"""Plot test accuracy against compression ratio from an accuracy-sweep results file.

Two panels (with and without reweighting, where the results hold both), one line per method: the mean over
seeds at the mean achieved compression ratio of each target, with a band from
the lowest to the highest seed. Methods with a global ranking are dashed. When
the rows were fine-tuned (``accuracy_sweep.py --finetune``), a second row of
panels shows the accuracy after fine-tuning.

    .venv/bin/python benchmarks/plot_sweep.py results/baselines_lenet.jsonl --model lenet \\
        --out results/baselines_lenet.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from subprune.methods import METHODS  # noqa: E402


def curves(rows: list[dict], reweight: bool,
           metric: str = "pruned_accuracy") -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> [(mean compression, mean accuracy %, min %, max %)] sorted by compression."""
    by_target: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["reweight"] == reweight:
            by_target.setdefault((r["method"], r["compression_target"] or r["keep"]), []).append(r)
    out: dict[str, list] = {}
    for (method, _), sel in by_target.items():
        acc = [100 * r[metric] for r in sel]
        ratio = statistics.mean(r["compression_ratio"] for r in sel)
        out.setdefault(method, []).append((ratio, statistics.mean(acc), min(acc), max(acc)))
    return {m: sorted(points) for m, points in out.items()}


def plot(rows: list[dict], model: str, out: Path) -> None:
    rows = [r for r in rows if r["model"] == model]
    if not rows:
        raise ValueError(f"no rows for model {model!r}")
    metrics = ["pruned_accuracy"] + (["finetuned_accuracy"] if all("finetuned_accuracy" in r for r in rows) else [])
    reweights = [rw for rw in (True, False) if any(r["reweight"] == rw for r in rows)]  # panels with data only
    fig, axes = plt.subplots(len(metrics), len(reweights), figsize=(7 * len(reweights), 4.8 * len(metrics)),
                             sharey=True, squeeze=False)
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "olive", "navy"]
    order = [m for m in METHODS if any(r["method"] == m for r in rows)]
    panels = [(ax, reweight, metric) for metric, line in zip(metrics, axes, strict=True)
              for ax, reweight in zip(line, reweights, strict=True)]
    for ax, reweight, metric in panels:
        data = curves(rows, reweight, metric)
        for method in order:
            if method not in data:
                continue
            x, mean, low, high = zip(*data[method], strict=True)
            style = "--" if METHODS[method].global_ranking else "-"
            colour = palette[list(METHODS).index(method) % len(palette)]  # one colour per method in every plot
            ax.plot(x, mean, style, marker="o", ms=3, color=colour, label=METHODS[method].name)
            ax.fill_between(x, low, high, color=colour, alpha=0.12)
        ax.axhline(100 * rows[0]["dense_accuracy"], color="grey", lw=0.8, ls=":", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (whole-network parameters, dense / pruned)")
        tuned = f", after fine-tuning ({rows[0]['finetune']} data)" if metric == "finetuned_accuracy" else ""
        ax.set_title(f"{model}: {'with' if reweight else 'without'} reweighting{tuned}")
        ax.grid(alpha=0.3)
    seeds = len({r["seed"] for r in rows})
    for line in axes:
        line[0].set_ylabel(f"top-1 test accuracy (%), mean and min-max over {seeds} seeds")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 0.13 * 2 / len(reweights), 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON-lines file of benchmarks/accuracy_sweep.py")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--budget", default="uniform", help="only rows of this per-site budget")
    parser.add_argument("--finetune", default=None, choices=["none", "limited", "full"],
                        help="only rows of this fine-tuning mode (default: the first row's)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    finetune = args.finetune or (rows[0].get("finetune", "none") if rows else "none")
    rows = [r for r in rows if r.get("budget", "uniform") == args.budget and r.get("finetune", "none") == finetune]
    plot(rows, args.model, Path(args.out))


if __name__ == "__main__":
    main()
