"""CPU latency of all-MiniLM-L6-v2 with a fraction of heads and FFN neurons removed.

Latency depends only on the pruned shapes, not on which units a method keeps,
so the models here are cut to the first units (no calibration). The models are
timed in interleaved rounds (dense, 25%, 50%, dense, ...) so that load from
other processes hits them alike; the median per model is reported, for one
batch of 8 Wikipedia passages x 128 tokens on ``--threads`` threads.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transformer_latency.py --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from subprune.evaluate import count_parameters
from subprune.hf.architectures import find_transformer_sites, prune_transformer_site_
from subprune.hf.models import load_minilm
from subprune.hf.text import tokenize, wikipedia_passages


def cut(model, removed: float):
    """A copy of ``model`` keeping the first (1 - removed) of the units of every site."""
    pruned = copy.deepcopy(model)
    for site in find_transformer_sites(pruned):
        k = max(1, round((1 - removed) * site.channels))
        if k < site.channels:
            prune_transformer_site_(pruned, site, torch.arange(k))
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, wikipedia_passages()[-8:], 128)
    models = {0.0: model, 0.25: cut(model, 0.25), 0.5: cut(model, 0.5)}
    times = {r: [] for r in models}
    with torch.no_grad():
        for m in models.values():
            m(**batch)  # warm-up
        for _ in range(args.rounds):
            for removed, m in models.items():
                start = time.perf_counter()
                m(**batch)
                times[removed].append(time.perf_counter() - start)
    dense = statistics.median(times[0.0])
    for removed, m in models.items():
        median = statistics.median(times[removed])
        print(json.dumps({"removed": removed, "params": count_parameters(m), "latency_ms": 1e3 * median,
                          "speedup": dense / median, "batch": list(batch["input_ids"].shape),
                          "threads": args.threads, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
