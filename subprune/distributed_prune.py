"""Prune a registered model with the calibration set split over processes (``torchrun``).

    torchrun --nproc_per_node=2 -m subprune.distributed_prune --model lenet --method asym --keep 0.25 \\
        --calib 512 --out runs/lenet25-dist

Every process draws the same calibration set (same seed), keeps its shard, and
accumulates that shard's Gram statistics; one all-reduce per site sums them, and
every process runs the same selection, so all hold the same pruned model. Rank 0
measures it (test accuracy, parameters, FLOPs, latency) and writes ``--out`` and
the report, which adds ``world_size``, ``device`` and ``peak_memory_bytes``.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) it runs as one
process. On GPUs each process uses ``cuda:LOCAL_RANK`` and the NCCL backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from subprune.cli import REPORT_FILE, _ratio
from subprune.data import DATASETS, calibration_indices, load_dataset
from subprune.distributed import rank, shard, world_size
from subprune.methods import METHODS
from subprune.models import MODELS, get_spec, load_model
from subprune.pipeline import PruneConfig, prune
from subprune.report import build_report, compare_models
from subprune.serialization import save_pruned
from subprune.statistics import PRECISIONS

log = logging.getLogger("subprune.distributed_prune")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m subprune.distributed_prune",
                                description="Pruning with calibration statistics summed over processes.")
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS))
    p.add_argument("--method", default="asym", choices=sorted(METHODS))
    p.add_argument("--keep", type=_ratio, default=0.5, help="keep ratio of every site, in (0, 1]")
    p.add_argument("--calib", type=int, default=512, help="calibration samples in total, over all processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda; default: cuda:LOCAL_RANK when CUDA is available")
    p.add_argument("--backend", default=None, help="torch.distributed backend; default nccl on CUDA, else gloo")
    p.add_argument("--offload", action="store_true", help="keep weights on the CPU, move one module at a time")
    p.add_argument("--precision", default="float64", choices=PRECISIONS)
    p.add_argument("--strided", action="store_true", help="shard by stride instead of contiguous blocks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--out", default=None, help="directory for the pruned model and report.json (rank 0)")
    p.add_argument("--json", action="store_true", help="print report.json (rank 0)")
    return p


def _device(requested: str | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def run(args: argparse.Namespace) -> dict | None:
    """Prune as configured; return the report on rank 0, None on the other ranks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    launched = "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    try:
        spec = get_spec(args.model)
        dataset = args.dataset or spec.dataset
        train_x, _ = load_dataset(dataset, "train")
        calibration = spec.preprocess(train_x[calibration_indices(train_x.shape[0], args.calib, args.seed)])
        part = shard(calibration, strided=args.strided)
        config = PruneConfig(method=args.method, keep=args.keep, batch_size=args.batch_size, seed=args.seed,
                             progress=False, device=device, offload=args.offload, precision=args.precision,
                             distributed=world_size() > 1)
        model = load_model(args.model)
        result = prune(model, part, config)
        log.info("rank %d: %d samples, peak memory %s bytes", rank(), part.shape[0], result.memory.peak_bytes)
        if rank() != 0:
            return None
        test_x, test_y = load_dataset(dataset, "test")
        measures = compare_models(model, result.model.cpu(), test_x, test_y, spec.preprocess)
        settings = {"model": args.model, "dataset": dataset, "calibration_samples": args.calib, "seed": args.seed,
                    "world_size": world_size(), "device": str(device),
                    "peak_memory_bytes": result.memory.peak_bytes, "peak_memory_kind": result.memory.what}
        report = build_report(result, measures, settings)
        if args.out:
            save_pruned(result.model, args.out, base_model=args.model, extra_json={REPORT_FILE: report})
        return report
    finally:
        if launched and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"world size {report['world_size']}, device {report['device']}: "
                  f"accuracy {report['dense_accuracy']:.2%} -> {report['pruned_accuracy']:.2%}, "
                  f"compression {report['compression_ratio']:.2f}x, prune {report['prune_seconds']:.2f} s, "
                  f"peak memory {report['peak_memory_bytes']} bytes ({report['peak_memory_kind']})")
            for s in report["sites"]:
                print(f"  {s['name']}: kept {s['kept']}/{s['channels']} f(S)={s['objective']:.4f} "
                      f"keep={s['keep_indices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
