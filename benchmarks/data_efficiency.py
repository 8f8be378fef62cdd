"""Data efficiency: test accuracy against the number of calibration samples, at a fixed compression ratio.

Runs :mod:`accuracy_sweep` once per calibration size (16 ... 1024 by default) with a
whole-network compression target, into one resumable JSON-lines file, then prints a
markdown table (rows: model x method x reweighting; columns: calibration samples;
cells: mean +- std over seeds). The paper's claim is that the curve flattens early.

    .venv/bin/python benchmarks/data_efficiency.py --models lenet --compression 8 \\
        --out results/data_efficiency_lenet.jsonl --table results/data_efficiency_lenet.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from accuracy_sweep import METHOD_NAMES, sweep

from subprune.methods import METHODS


def efficiency_table(rows: list[dict], calibs: list[int], compression: float, test_subset: int | None = None) -> str:
    """Markdown table of accuracy (%) per calibration size."""
    rows = [r for r in rows if r.get("compression_target") == compression and r["calib"] in calibs
            and r.get("test_subset") == test_subset and r.get("finetune", "none") == "none"]
    lines = [
        f"Compression target x{compression:g} (whole-network parameters), mean ± std over seeds, no fine-tuning.",
        "",
        "| model | method | reweight | " + " | ".join(f"{c} samples" for c in calibs) + " |",
        "|---|---|---|" + "---|" * len(calibs),
    ]
    groups = sorted({(r["model"], r["method"], r["reweight"]) for r in rows},
                    key=lambda g: (g[0], list(METHOD_NAMES).index(g[1]), not g[2]))
    for model, method, reweight in groups:
        cells = []
        for c in calibs:
            acc = [100 * r["pruned_accuracy"] for r in rows
                   if (r["model"], r["method"], r["reweight"], r["calib"]) == (model, method, reweight, c)]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.mean(acc):.2f} ± {std:.2f}" if acc else "-")
        label = f"| {model} | {METHOD_NAMES[method]} | {'yes' if reweight else 'no'} | "
        lines.append(label + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet"])
    parser.add_argument("--methods", nargs="+", default=["layer", "seq", "asym", "weightnorm", "layer-actgrad"],
                        choices=list(METHODS))
    parser.add_argument("--calibs", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--compression", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--test-subset", type=int, default=None, metavar="N",
                        help="measure accuracy on the first N test images only (recorded in each row)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/data_efficiency_lenet.jsonl")
    parser.add_argument("--table", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for calib in args.calibs:
        sweep_args = argparse.Namespace(
            models=args.models, methods=args.methods, targets="compression", keeps=[],
            compressions=[args.compression], budget="uniform", seeds=args.seeds, calib=calib,
            ridge=args.ridge, out=args.out, reweight="both", finetune="none", finetune_epochs=None,
            test_subset=args.test_subset,
        )
        rows = sweep(sweep_args)  # returns every row of the file, old and new
    text = efficiency_table(rows, args.calibs, args.compression, args.test_subset)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    main()
