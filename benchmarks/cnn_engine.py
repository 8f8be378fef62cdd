"""Cost of Layer/Seq/AsymInChange on CNNs: the per-site driver against the staged engine, one table.

For every model and method, the same prune runs with ``engine="per-site"`` (one
run from the input to each site, as before) and ``engine="staged"``
(:mod:`subprune.staged`), interleaved, ``--repeats`` times; the table gives the
medians of: wall-clock and CPU seconds (user + sys of this process), their ratio
to one dense forward pass over the same calibration images (the median of 3,
timed in the same run, same batch size), how often the model ran (dense-forward
equivalents: leaf-module executions, counted with a global forward pre-hook, over those of one
dense forward pass), the CPU seconds of the channel selection (the solver, the same
for both), the staged engine's own split of its time (graph runs, statistics updates), the peak RSS of the run, and
whether both engines kept the same units (and the largest output difference of
the two pruned models).

Models: timm ``efficientnet_b0`` (random weights, ``--size`` px random images,
needs ``make zoo-extras``), any timm architecture as ``timm:ARCH`` or
``timm:ARCH{"img_size": 64}`` (same images), the registered ``resnet-fmnist``
(CIFAR ResNet-20 trained here) on Fashion-MNIST training images and ``lenet`` on
MNIST training images. Run on one
CPU thread unless ``--threads`` says otherwise.

    python benchmarks/cnn_engine.py --quick
    OMP_NUM_THREADS=1 python benchmarks/cnn_engine.py --table results/cnn_engine.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from subprune.methods import METHODS
from subprune.pipeline import PruneConfig, prune
from subprune.staged import counting_calls, dense_forward_equivalents

ENGINES = ("per-site", "staged")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(name: str, n: int, size: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The model (eval mode), ``n`` calibration images and a description of both.

    ``cnn:ARCH`` is a reference architecture of :mod:`subprune.models.cnn` (random weights, 16 px random
    images); ``cnn:ARCH+coupled`` prunes its coupled residual sites too.
    """
    if name.startswith("cnn:"):
        from subprune.models.cnn import ARCHITECTURES

        arch = name.removeprefix("cnn:").removesuffix("+coupled")
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        mode = "coupled sites" if name.endswith("+coupled") else "block-internal sites"
        return ARCHITECTURES[arch](0), x, f"reference {arch} ({mode}), random weights, {n} random images 3x16x16"
    if name.startswith("timm:"):  # timm:ARCH or timm:ARCH{json kwargs}, e.g. timm:vit_small_patch16_224{"img_size": 64}
        import json

        from subprune.models.timm_import import import_timm

        arch, _, extra = name.removeprefix("timm:").partition("{")
        kwargs = json.loads("{" + extra) if extra else {}
        torch.manual_seed(0)
        model = import_timm().create_model(arch, pretrained=False, **kwargs).eval()
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        params = sum(p.numel() for p in model.parameters())
        return model, x, (f"timm {arch}{' ' + json.dumps(kwargs) if kwargs else ''} ({params / 1e6:.1f}M parameters, "
                          f"{params * 4 / 2**20:.0f} MiB), random weights, {n} random images 3x{size}x{size}")
    if name == "efficientnet_b0":
        from subprune.models.timm_import import import_timm

        torch.manual_seed(0)
        model = import_timm().create_model("efficientnet_b0", pretrained=False).eval()
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        return model, x, f"timm efficientnet_b0, random weights, {n} random images 3x{size}x{size}"
    from subprune.data import load_dataset
    from subprune.models import get_spec, load_model

    spec = get_spec(name)
    images, _ = load_dataset(spec.dataset, "train")
    x = spec.preprocess(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]])
    return load_model(name), x, f"registered {name} (trained weights), {n} {spec.dataset} training images"


def dense_forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one forward pass over ``x`` in batches, 3 runs."""
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = time.perf_counter(), _cpu()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size])
        walls.append(time.perf_counter() - wall)
        cpus.append(_cpu() - cpu)
    return statistics.median(walls), statistics.median(cpus)


@contextlib.contextmanager
def timed_selection(method: str) -> Iterator[list[float]]:
    """CPU seconds spent in the method's channel selection (the greedy solver), summed over sites."""
    spent = [0.0]
    original = METHODS[method]

    def select(*args, **kwargs):
        start = _cpu()
        try:
            return original.select(*args, **kwargs)
        finally:
            spent[0] += _cpu() - start

    METHODS[method] = dataclasses.replace(original, select=select)
    try:
        yield spent
    finally:
        METHODS[method] = original


def dense_calls(model, x: torch.Tensor, batch_size: int) -> dict[str, int]:
    """Leaf-module executions of one dense forward pass over ``x`` (the unit of the passes column)."""
    with counting_calls(min_batch=3) as counts, torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    return counts


def one_run(model, x, method: str, engine: str, batch_size: int, keep: float, dense: dict[str, int],
            coupled: bool = False) -> dict:
    config = PruneConfig(method=method, keep=keep, engine=engine, batch_size=batch_size, progress=False,
                         coupled=coupled)
    with counting_calls(min_batch=3) as counts, timed_selection(method) as selection:
        wall, cpu = time.perf_counter(), _cpu()
        result = prune(model, x, config)
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    return {"wall": wall, "cpu": cpu, "passes": dense_forward_equivalents(counts, dense), "result": result,
            "selection": selection[0], "rss": result.memory.peak_bytes / 2**20, "rss_what": result.memory.what}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models:
        model, x, what = load(name, args.calib, args.size)
        dense_wall, dense_cpu = dense_forward(model, x, args.batch_size)
        dense = dense_calls(model, x, args.batch_size)
        print(f"{what}: one dense forward {dense_wall:.2f} s wall, {dense_cpu:.2f} s CPU", file=sys.stderr)
        for method in args.methods:
            runs: dict[str, list[dict]] = {e: [] for e in args.engines}
            for _ in range(args.repeats):
                for engine in args.engines:
                    runs[engine].append(one_run(model, x, method, engine, args.batch_size, args.keep, dense,
                                               name.endswith("+coupled")))
            last = {e: runs[e][-1]["result"] for e in args.engines}
            same, diff = None, None
            if len(last) == 2:
                same = [s.keep for s in last["per-site"].sites] == [s.keep for s in last["staged"].sites]
                with torch.no_grad():
                    diff = float((last["per-site"].model(x[:16]) - last["staged"].model(x[:16])).abs().max())
            for engine in args.engines:
                med = {k: statistics.median(r[k] for r in runs[engine]) for k in ("wall", "cpu", "passes", "rss",
                                                                         "selection")}
                seconds = last[engine].engine_seconds
                rows.append({
                    "model": name, "what": what, "method": method, "engine": engine, "sites": len(last[engine].sites),
                    "used": last[engine].engine, "dense_wall": dense_wall, "dense_cpu": dense_cpu, **med,
                    "cpu_ratio": med["cpu"] / dense_cpu, "wall_ratio": med["wall"] / dense_wall,
                    "rest_ratio": (med["cpu"] - med["selection"]) / dense_cpu,
                    "stream_passes": last[engine].passes, "seconds": seconds, "same": same, "diff": diff,
                    "repeats": args.repeats, "rss_what": runs[engine][-1]["rss_what"],
                })
                r = rows[-1]
                print(f"{name} {method} {engine}: {r['cpu']:.1f} s CPU (x{r['cpu_ratio']:.1f} dense), "
                      f"{r['passes']:.2f} passes, same keep {same}", file=sys.stderr)
    return rows


def table(rows: list[dict], args: argparse.Namespace, command: str, load_start: tuple[float, ...]) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Keep ratio {args.keep} at every site (block-internal sites unless said, reweighting), "
        f"batch size {args.batch_size}, "
        f"{torch.get_num_threads()} CPU thread(s), medians of {args.repeats} interleaved run(s) per engine; "
        f"load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} (1/5/15 min) on a "
        "2-core machine shared with other jobs, so wall-clock is noisier than CPU seconds.",
        "",
        "*x dense*: seconds / one dense forward pass over the same calibration images (same run, same batch size). "
        "*selection CPU s*: CPU seconds in the method's channel selection (the greedy solver, the same work for "
        "both engines); *(CPU - selection) x dense*: the rest (forward passes, statistics, tracing, refit, "
        "surgery) over one dense forward. *passes*: leaf-module executions (a global forward pre-hook) over those "
        "of one dense forward on the same images, so 1.0 = one pass (the 2-sample trace/check runs are not "
        "counted). *staged split*: the staged "
        "engine's dense-forward equivalents per stream (pruned + dense). Peak RSS: the process's peak during the "
        "run (VmHWM reset before each run), model and data included. *staged runs / statistics s*: the staged engine's "
        "wall-clock in graph runs and in Gram updates (the rest is tracing, selection, refit and surgery).",
        "",
    ]
    for what in dict.fromkeys(r["what"] for r in rows):
        first = next(r for r in rows if r["what"] == what)
        lines += [f"**{what}**: one dense forward {first['dense_wall']:.2f} s wall, {first['dense_cpu']:.2f} s CPU.",
                  "",
                  "| method | engine | sites | wall s | CPU s | wall x dense | CPU x dense | selection CPU s | "
                  "(CPU - selection) x dense | passes | staged split | staged runs / statistics s | peak RSS MiB | "
                  "same kept units | max output diff | speed-up (CPU) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        here = [r for r in rows if r["what"] == what]
        for r in here:
            base = next((b for b in here if b["method"] == r["method"] and b["engine"] == "per-site"), r)
            split = " + ".join(f"{v:.2f}" for v in r["stream_passes"].values()) if r["stream_passes"] else "-"
            sec = r["seconds"]
            parts = f"{sec['forward']:.1f} / {sec['statistics']:.1f}" if sec else "-"
            engine = r["engine"] if r["used"] in ("staged", "dense, one pass") or r["engine"] == "per-site" else \
                f"{r['engine']} ({r['used']})"
            lines.append(
                f"| {r['method']} | {engine} | {r['sites']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                f"{r['wall_ratio']:.1f} | {r['cpu_ratio']:.1f} | {r['selection']:.1f} | {r['rest_ratio']:.1f} | "
                f"{r['passes']:.2f} | {split} | {parts} | "
                f"{r['rss']:.0f} | {'-' if r['same'] is None else 'yes' if r['same'] else 'NO'} | "
                f"{'-' if r['diff'] is None else format(r['diff'], '.1e')} | {base['cpu'] / r['cpu']:.2f} |")
        lines.append("")
    lines.append("Joint refits (a consumer that several sites feed: DenseNet concatenations, option-A shortcuts) "
                 "are counted in *passes*; with the staged engine they read their inputs from its caches.")
    lines.append("")
    lines.append("Layer collects every site's statistics from the dense model in one pass with either engine "
                 "(the engine only changes Seq and Asym), so its two rows differ by noise only.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet-fmnist", "lenet"])
    parser.add_argument("--methods", nargs="+", default=["layer", "seq", "asym"])
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--size", type=int, default=128, help="image side for efficientnet_b0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="one engine only: no same-units column (e.g. peak RSS of two library versions)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="lenet and efficientnet_b0 at 32 images of 64 px")
    parser.add_argument("--table", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.calib, args.size = ["lenet", "efficientnet_b0"], 32, 64
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = run(args)
    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/cnn_engine.py", *(argv or sys.argv[1:])])
    text = table(rows, args, command, load_start)
    print(text)
    if args.table:
        args.table.write_text(text)


if __name__ == "__main__":
    main()
