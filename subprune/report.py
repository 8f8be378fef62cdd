"""Measure a dense and a pruned model side by side and present the result.

``compare_models`` gathers test accuracy, parameters, FLOPs and CPU latency of
both models; ``build_report`` turns a :class:`~subprune.pipeline.PruneResult`
and those measurements into the JSON-serialisable ``report.json`` dictionary
(keys documented in the README); ``print_report`` renders it with rich tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from subprune.evaluate import accuracy, count_flops, count_parameters, measure_latency
from subprune.pipeline import PruneResult


def compare_models(
    dense: nn.Module,
    pruned: nn.Module,
    images: Tensor,
    labels: Tensor,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    latency_batch: int = 256,
    latency_repeats: int = 30,
) -> dict:
    """Accuracy, parameters, FLOPs and median CPU latency of both models.

    Parameters
    ----------
    dense, pruned : nn.Module
    images : Tensor of shape (N, ...)
        Test inputs in dataset format; ``preprocess`` maps them to model inputs.
    labels : Tensor of shape (N,)
    latency_batch : int
        Batch size of the latency measurement (seconds per batch, median).

    Returns
    -------
    dict with keys dense_/pruned_ accuracy (fraction), params, flops (per sample,
    2 x multiply-accumulates of Conv2d/Linear), latency_s, and latency_batch.
    """
    prep = preprocess or (lambda x: x)
    example = prep(images[:latency_batch])
    out = {"latency_batch": int(example.shape[0])}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        out[f"{tag}_accuracy"] = accuracy(model, images, labels, preprocess)
        out[f"{tag}_params"] = count_parameters(model)
        out[f"{tag}_flops"] = count_flops(model, example[:1])
    # Interleave the two latency measurements so machine noise hits both alike.
    times = {"dense": [], "pruned": []}
    for _ in range(3):
        for tag, model in (("dense", dense), ("pruned", pruned)):
            times[tag].append(measure_latency(model, example, repeats=max(1, latency_repeats // 3)))
    for tag, values in times.items():
        out[f"{tag}_latency_s"] = float(torch.tensor(values).median())
    return out


def build_report(result: PruneResult, measures: dict, settings: dict) -> dict:
    """The report.json dictionary (see the README for every key).

    Parameters
    ----------
    result : PruneResult
    measures : dict
        Output of :func:`compare_models`.
    settings : dict
        Model, dataset, calibration size, seed... as given on the command line.
    """
    cfg = result.config
    keep = dict(cfg.keep) if isinstance(cfg.keep, dict) else cfg.keep
    if cfg.compression is not None:
        keep = None  # the compression target sets the keep ratios; each site's kept count is in "sites"
    report = {
        **settings,
        "method": cfg.method,
        "keep": keep,
        "compression_target": cfg.compression,
        "budget": cfg.budget,
        "reweight": cfg.reweight,
        "epsilon": cfg.epsilon,
        "ridge": cfg.ridge,
        **measures,
        "compression_ratio": measures["dense_params"] / measures["pruned_params"],
        "flops_ratio": measures["dense_flops"] / measures["pruned_flops"],
        "speedup": measures["dense_latency_s"] / measures["pruned_latency_s"],
        "prune_seconds": result.seconds,
        "sites": [
            {
                "name": s.name,
                "producer": s.producer,
                "consumer": s.consumer,
                "channels": s.channels,
                "kept": s.kept,
                "objective": s.objective,
                "group_size": s.group_size,
                "rows": s.rows,
                "ridge": s.ridge,
                "seconds": s.seconds,
                "keep_indices": s.keep,
                "objective_curve": s.objective_curve,
                "producers": s.producers,
                "consumers": s.consumers,
                "coupled": s.coupled,
            }
            for s in result.sites
        ],
        "coupled": cfg.coupled,
        "joint_refits": dict(result.joint_refits),
        "skipped": [asdict(s) for s in result.skipped],
        "unselected": list(result.unselected),
    }
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    """Print the dense-vs-pruned table, the per-site table and the skipped layers."""
    console = console or Console()
    target = (f"compression target x{report['compression_target']:g}" if report.get("compression_target")
              else f"keep {report['keep']}")
    summary = Table(title=f"{report.get('model', 'model')}: {report['method']} pruning, {target}")
    summary.add_column("")
    summary.add_column("dense", justify="right")
    summary.add_column("pruned", justify="right")
    summary.add_column("ratio", justify="right")
    label = "test accuracy" if "measured_on" not in report else f"accuracy ({report['measured_on']})"
    if "dense_accuracy" in report:
        summary.add_row(
            label, f"{report['dense_accuracy']:.2%}", f"{report['pruned_accuracy']:.2%}",
            f"{100 * (report['pruned_accuracy'] - report['dense_accuracy']):+.2f} pp",
        )
    if "agreement" in report:  # the user's own data: how closely the pruned model follows the dense one
        summary.add_row(f"top-1 agreement with dense ({report['measured_samples']:,} {report['measured_on']})",
                        "", f"{report['agreement']:.2%}", "")
        summary.add_row("relative output error", "", f"{report['relative_output_error']:.4f}", "")
    if "finetuned_accuracy" in report:
        epochs = report["finetune_schedule"]["epochs"]
        epochs = f"{epochs} epoch" + ("s" if epochs != 1 else "")
        summary.add_row(
            f"after fine-tuning ({report['finetune']} data, {report['finetune_samples']:,} images, {epochs})",
            "", f"{report['finetuned_accuracy']:.2%}",
            f"{100 * (report['finetuned_accuracy'] - report['dense_accuracy']):+.2f} pp",
        )
    summary.add_row(
        "parameters", f"{report['dense_params']:,}", f"{report['pruned_params']:,}",
        f"{report['compression_ratio']:.2f}x smaller",
    )
    summary.add_row(
        "FLOPs / sample", f"{report['dense_flops']:,}", f"{report['pruned_flops']:,}",
        f"{report['flops_ratio']:.2f}x fewer",
    )
    summary.add_row(
        f"CPU latency / batch of {report['latency_batch']}",
        f"{report['dense_latency_s'] * 1e3:.2f} ms", f"{report['pruned_latency_s'] * 1e3:.2f} ms",
        f"{report['speedup']:.2f}x faster",
    )
    console.print(summary)

    sites = Table(title="pruning sites (f(S): share of the consumer's pre-activation energy kept)")
    for column in ("site", "consumer", "channels", "kept", "f(S)", "rows", "seconds"):
        sites.add_column(column, justify="left" if column in ("site", "consumer") else "right")
    for s in report["sites"]:
        sites.add_row(
            s["name"], s["consumer"], str(s["channels"]), str(s["kept"]), f"{s['objective']:.4f}",
            f"{s['rows']:,}", f"{s['seconds']:.2f}",
        )
    console.print(sites)
    for s in report["skipped"]:
        console.print(f"[dim]not pruned: {s['name']}: {s['reason']}[/dim]")
    for name in report.get("unselected", []):
        console.print(f"[dim]not pruned: {name}: not selected (--layers or --keep-site)[/dim]")
    console.print(f"pruning took {report['prune_seconds']:.2f} s")
