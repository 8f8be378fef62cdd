"""Measured CPU latency, FLOPs and parameters of pruned against dense CNNs, one table.

For every reference architecture of :mod:`subprune.models.cnn` (randomly
initialised, 3x32x32 inputs) and both site modes (block-internal only, and with
coupled residual sites), prune every site at ``--keep`` with LayerInChange and
reweighting on ``--calib`` random calibration images, then measure the dense and
the pruned model side by side: median CPU seconds per forward pass at batch 1 and
batch 64 (the two models timed in alternation, ``--rounds`` rounds, median of the
round medians), FLOPs per sample (2 x MACs of Conv2d/Linear, grouped convs count
c_in/groups) and parameters. Ratios are dense / pruned (> 1 means smaller or
faster). Runs on one CPU thread unless ``--threads`` says otherwise.

    python benchmarks/cnn_speed.py --quick
    python benchmarks/cnn_speed.py --table results/cnn_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from subprune.evaluate import count_flops, count_parameters, measure_latency
from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import PruneConfig, prune


def _latency(dense, pruned, batch: torch.Tensor, rounds: int, repeats: int) -> tuple[float, float]:
    """Median over rounds of each model's median latency, the two models timed in alternation."""
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for tag, model in (("dense", dense), ("pruned", pruned)):
            times[tag].append(measure_latency(model, batch, repeats=repeats, warmup=2))
    return statistics.median(times["dense"]), statistics.median(times["pruned"])


def _skipped_text(skipped) -> str:
    """Skipped layers grouped by reason, e.g. ``fc: last layer``."""
    short = []
    for s in skipped:
        reason = s.reason
        if "last layer" in reason:
            reason = "last layer"
        elif "coupled=True" in reason:
            reason = "residual (needs coupled)"
        elif "zero-pads the channel" in reason:
            reason = "inline channel F.pad (option A without ZeroPadShortcut)"
        short.append(reason)
    return "; ".join(f"{n}x {r}" for r, n in Counter(short).items()) or "-"


def run(args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(args.calib, 3, 32, 32, generator=generator)
    rows = []
    for arch in args.arch or sorted(ARCHITECTURES):
        dense = ARCHITECTURES[arch](0)
        for coupled in (False, True):
            start = time.perf_counter()
            config = PruneConfig(method="layer", keep=args.keep, coupled=coupled, progress=False)
            result = prune(dense, calibration, config)
            pruned = result.model.eval()
            prune_s = time.perf_counter() - start
            row = {
                "arch": arch, "mode": "coupled" if coupled else "block",
                "sites": len(result.sites), "coupled_groups": sum(s.coupled for s in result.sites),
                "skipped": _skipped_text(result.skipped),
                "params_ratio": count_parameters(dense) / count_parameters(pruned),
                "flops_ratio": count_flops(dense, calibration[:1]) / count_flops(pruned, calibration[:1]),
                "prune_s": prune_s,
            }
            for batch in (1, 64):
                x = torch.randn(batch, 3, 32, 32, generator=generator)
                with torch.no_grad():
                    d, p = _latency(dense, pruned, x, args.rounds, args.repeats)
                row[f"dense_ms_b{batch}"], row[f"pruned_ms_b{batch}"] = 1e3 * d, 1e3 * p
                row[f"speedup_b{batch}"] = d / p
            rows.append(row)
            print(f"{arch:17s} {row['mode']:7s} sites {row['sites']:2d} params x{row['params_ratio']:.2f} "
                  f"flops x{row['flops_ratio']:.2f} latency b1 x{row['speedup_b1']:.2f} "
                  f"b64 x{row['speedup_b64']:.2f} (pruned in {prune_s:.1f}s)", flush=True)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Keep ratio {args.keep} at every site, LayerInChange with reweighting, {args.calib} random calibration "
        f"images, {torch.get_num_threads()} CPU thread(s); ratios are dense / pruned; latency is the median "
        "ms per forward pass (dense -> pruned).",
        "",
        "| architecture | mode | sites | coupled groups | skipped (count x reason) | params ratio | FLOPs ratio "
        "| latency b1 ms | ratio b1 | latency b64 ms | ratio b64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['mode']} | {r['sites']} | {r['coupled_groups']} | {r['skipped']} "
            f"| {r['params_ratio']:.2f} | {r['flops_ratio']:.2f} "
            f"| {r['dense_ms_b1']:.2f} -> {r['pruned_ms_b1']:.2f} | {r['speedup_b1']:.2f} "
            f"| {r['dense_ms_b64']:.1f} -> {r['pruned_ms_b64']:.1f} | {r['speedup_b64']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.5, help="keep ratio of every site (default 0.5)")
    parser.add_argument("--calib", type=int, default=128, help="random calibration images")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per batch size")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHITECTURES), help="only these (repeatable)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 repeats, 64 calibration images")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.calib = 3, 3, 64
    torch.set_num_threads(args.threads)
    text = table(run(args), args)
    print()
    print(text)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + "\n")


if __name__ == "__main__":
    main()
