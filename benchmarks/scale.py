"""How pruning time and memory grow with model size, calibration size and the solver's d (CPU).

Three series:

1. whole-model pruning (AsymInChange, keep 0.5) of MLPs and CNNs of growing
   width, fixed calibration size;
2. the same for one MLP and a growing number of calibration samples;
3. the greedy solver alone on a d x d Gram matrix, d up to 16,384: seconds per
   greedy step (O(d^2) each) and the extrapolated time of a full run to k = d/2.

Series 1 and 2 run each configuration in a fresh subprocess (one torch thread)
so that its peak resident memory (ru_maxrss) is its own; the prune time is the
median of ``--repeats`` runs. The tables give ratios to the smallest
configuration and the growth exponent (log-log least-squares slope) of time and
of the memory increment that pruning adds on top of the loaded model and data.

    python benchmarks/scale.py --quick          # under 3 minutes on 2 CPU cores
    python benchmarks/scale.py                  # larger sizes, solver to d = 16,384
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

KIB = 1024
SERIES = ["mlp", "cnn", "calibration", "solver"]


def make_mlp(width: int, depth: int = 4, inputs: int = 256, outputs: int = 10) -> nn.Module:
    """An MLP inputs -> width x depth (ReLU) -> outputs, seeded."""
    torch.manual_seed(0)
    layers, fan_in = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, outputs)).eval()


def make_cnn(width: int) -> nn.Module:
    """A VGG-like CNN on 3 x 16 x 16 inputs: conv w, conv w, pool, conv 2w, conv 2w, pool, fc 10."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 10),
    ).eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(spec: dict) -> dict:
    """One configuration, in this (fresh) process: prune ``repeats`` times, measure time and memory."""
    from subprune.pipeline import PruneConfig, prune

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    if spec["kind"] == "mlp":
        model = make_mlp(spec["width"])
        calibration = torch.randn(spec["samples"], 256, generator=gen)
    else:
        model = make_cnn(spec["width"])
        calibration = torch.randn(spec["samples"], 3, 16, 16, generator=gen)
    config = PruneConfig(method=spec["method"], keep=0.5, progress=False, precision=spec["precision"],
                         device=spec["device"], offload=spec["offload"], chunk_bytes=spec["chunk_mib"] * 2**20)
    prune(make_mlp(8, depth=2, inputs=8), torch.randn(4, 8), config)  # warm-up: lazy imports and first calls
    before = _rss_bytes()
    seconds, peaks = [], []
    for _ in range(spec["repeats"]):
        result = prune(model, calibration, config)
        seconds.append(result.seconds)
        peaks.append(result.memory.peak_bytes)
    return {
        **spec,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": statistics.median(seconds),
        "rss_before_bytes": before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB,
        "prune_peak_bytes": max(peaks),
        # CPU: what pruning adds to the resident set; CUDA: the device peak itself (max_memory_allocated).
        "prune_added_bytes": max(peaks) - (0 if result.memory.device.startswith("cuda") else before),
        "memory_kind": result.memory.what,
    }


def run_in_subprocess(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: the growth exponent."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def print_series(title: str, rows: list[dict], size_key: str) -> dict:
    """A table with ratios to the first row and log-log growth exponents; returns the exponents."""
    print(f"\n## {title}\n")
    added = "device peak MiB" if rows[0]["memory_kind"].startswith("torch.cuda") else "+prune MiB"
    print(f"| {size_key} | params | samples | prune s | time ratio | peak RSS MiB | {added} | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]
    extra = [max(r["prune_added_bytes"], 1) for r in rows]
    for row, add in zip(rows, extra, strict=True):
        print(f"| {row[size_key]} | {row['params']:,} | {row['samples']} | {row['seconds']:.3f} | "
              f"{row['seconds'] / base['seconds']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} | "
              f"{add / 2**20:.1f} | {add / extra[0]:.2f} |")
    sizes = [r[size_key] for r in rows]
    growth = {"time_vs_" + size_key: slope(sizes, [r["seconds"] for r in rows]),
              "prune_memory_vs_" + size_key: slope(sizes, extra)}
    if size_key != "samples":
        growth["time_vs_params"] = slope([r["params"] for r in rows], [r["seconds"] for r in rows])
    print("\ngrowth exponents (log-log slope): " + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()))
    return growth


def kms_gram(d: int, rho: float = 0.95) -> torch.Tensor:
    """The Kac-Murdock-Szego matrix rho^|i-j| (d, d), float64: positive definite, built in O(d^2)."""
    idx = torch.arange(d, dtype=torch.float64)
    gram = torch.empty(d, d, dtype=torch.float64)
    for start in range(0, d, 1024):  # row blocks: no d x d temporaries
        gram[start : start + 1024] = torch.pow(rho, (idx[start : start + 1024, None] - idx[None, :]).abs_())
    return gram


def solver_series(dims: list[int], steps: int, outputs: int, horizon: int = 512) -> list[dict]:
    """Both greedy solvers (g = 1) on a d x d Gram matrix: seconds per step, and time to ``horizon`` steps.

    The dense-residual solver costs the same every step (O(d^2)), so ``steps`` steps are timed and
    multiplied out; the factored solver's steps grow with j (O(d (j + m))), so it is timed to the end.
    """
    from subprune.solver import greedy_select
    from subprune.solver_factored import greedy_select_factored

    torch.set_num_threads(1)
    rows = []
    print(f"\n## Greedy solver alone (g = 1, m = {outputs}, 1 thread)\n")
    print(f"dense: residual R updated in place, {steps} steps timed; factored: R = G - U U^T, timed to k.\n")
    print("| d | Gram MiB | k | dense s/step | dense to k (s, extrapolated) | factored to k (s) | speed-up |"
          " dense full k = d/2 (s, extrapolated) |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dims:
        gram = kms_gram(d)
        weight = torch.randn(d, outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        energy = float((weight * (gram @ weight)).sum())
        k = min(horizon, d // 2)
        greedy_select(gram, weight, energy, 1, 2)  # warm-up
        start = time.perf_counter()
        dense = greedy_select(gram, weight, energy, 1, steps)
        per_step = (time.perf_counter() - start) / steps
        start = time.perf_counter()
        factored = greedy_select_factored(gram, weight, energy, 1, k)
        factored_s = time.perf_counter() - start
        same = factored.order[:steps].tolist() == dense.order.tolist()
        rows.append({"d": d, "k": k, "dense_seconds_per_step": per_step, "dense_seconds_to_k": per_step * k,
                     "factored_seconds_to_k": factored_s, "same_first_steps": same,
                     "dense_full_run_seconds": per_step * d / 2})
        print(f"| {d} | {d * d * 8 / 2**20:.0f} | {k} | {per_step:.4f} | {per_step * k:.1f} | {factored_s:.2f} | "
              f"{per_step * k / factored_s:.0f}x | {per_step * d / 2:.0f} |", flush=True)
        if not same:
            print(f"WARNING: d={d}: the two solvers chose differently in the first {steps} steps")
        del gram
    exp = slope([r["d"] for r in rows], [r["dense_seconds_per_step"] for r in rows])
    exp_f = slope([r["d"] for r in rows], [r["factored_seconds_to_k"] for r in rows])
    print(f"\ngrowth exponents vs d: dense seconds per step {exp:.2f} (theory 2), "
          f"factored seconds to k {exp_f:.2f} (theory 1 at fixed k)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes")
    parser.add_argument("--method", default="asym")
    parser.add_argument("--precision", default="float64")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default=None, help="compute device (default: cpu)")
    parser.add_argument("--offload", action="store_true", help="layer-by-layer offloading to --device")
    parser.add_argument("--chunk-mib", type=int, default=64, help="PruneConfig.chunk_bytes in MiB (unfolded patches)")
    parser.add_argument("--only", nargs="+", choices=SERIES, default=SERIES, help="run only these series")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    common = {"method": args.method, "precision": args.precision, "repeats": repeats, "device": args.device,
              "offload": args.offload, "chunk_mib": args.chunk_mib}
    mlp_widths = [128, 256, 512, 1024]
    cnn_widths = [8, 16, 32] if quick else [8, 16, 32, 64]
    samples = [128, 256, 512, 1024, 2048] if quick else [128, 256, 512, 1024, 2048, 4096]
    dims = [1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    start = time.perf_counter()
    print(f"# subprune scale benchmark ({'quick' if quick else 'full'}): method {args.method}, keep 0.5, "
          f"precision {args.precision}, chunks of {args.chunk_mib} MiB, median of {repeats}, 1 torch thread, "
          "each configuration in a fresh process")
    results: dict = {"settings": {"quick": quick, **common}}
    if "mlp" in args.only:
        mlp = [run_in_subprocess({**common, "kind": "mlp", "width": w, "samples": 512}) for w in mlp_widths]
        results["mlp_width"] = {"rows": mlp,
                                "growth": print_series("MLP (4 hidden layers), 512 samples", mlp, "width")}
    if "cnn" in args.only:
        cnn = [run_in_subprocess({**common, "kind": "cnn", "width": w, "samples": 128}) for w in cnn_widths]
        results["cnn_width"] = {"rows": cnn,
                                "growth": print_series("CNN (4 convs, 16x16 inputs), 128 samples", cnn, "width")}
    if "calibration" in args.only:
        calib = [run_in_subprocess({**common, "kind": "mlp", "width": 256, "samples": n}) for n in samples]
        results["calibration"] = {"rows": calib,
                                  "growth": print_series("MLP width 256, growing calibration set", calib, "samples")}
    if "solver" in args.only:
        results["solver"] = solver_series(dims, steps=8 if quick else 16, outputs=64)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
