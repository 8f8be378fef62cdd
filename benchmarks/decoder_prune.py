"""Prune a small decoder's attention heads and FFN neurons; perplexity on held-out Wikipedia text.

The decoder is a ``save_pretrained`` directory, by default the small GPT-2 that
``scripts/train_gpt2_wiki.py`` trains (any GPT-2 / OPT / LLaMA-style checkpoint
on disk works). For every method x refit x fraction removed: calibrate on
``--calib`` training passages (no labels), remove the same fraction of heads and
of FFN neurons in every block, then measure perplexity on the held-out passages
(the last 256 of the dump, never trained on), parameters and median CPU latency
of one batch (8 passages x 128 tokens). JSON-lines rows, resumable; markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_gpt2_wiki.py --out runs/gpt2-wiki
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_prune.py --model runs/gpt2-wiki \
        --out results/gpt2_wiki.jsonl --table results/gpt2_wiki.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from subprune.evaluate import count_parameters, measure_latency
from subprune.hf.evaluate import perplexity
from subprune.hf.models import load_transformer
from subprune.hf.prune import TRANSFORMER_METHODS, TransformerPruneConfig, prune_transformer
from subprune.hf.text import split_passages, tokenize, wikipedia_passages

HELDOUT = 256  # as in scripts/train_gpt2_wiki.py


def evaluate(model, data: dict) -> dict:
    latency = measure_latency(model, data["latency"]["input_ids"], repeats=10, warmup=2)
    return {"perplexity": perplexity(model, data["heldout"]), "params": count_parameters(model),
            "latency_ms": 1e3 * latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/gpt2-wiki")
    parser.add_argument("--out", default="results/gpt2_wiki.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--methods", nargs="+", default=["asym", "magnitude", "wanda", "flap"],
                        choices=sorted(TRANSFORMER_METHODS))
    parser.add_argument("--removed", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--calib", type=int, default=128, help="calibration passages (from the training text)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--intercept", action="store_true",
                        help="also refit the consumer bias (TransformerPruneConfig.intercept); rows marked +bias")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["method"], r["reweight"], r["removed"], r["calib"], r.get("intercept", False)) for r in rows}
    model, tokenizer = load_transformer(args.model, causal_lm=True)
    passages = wikipedia_passages()
    train_text, heldout_text = split_passages(passages, len(passages) - HELDOUT, HELDOUT)
    data = {
        "calibration": tokenize(tokenizer, train_text[: args.calib], args.max_length),
        "heldout": tokenize(tokenizer, heldout_text, args.max_length),
        "latency": tokenize(tokenizer, heldout_text[:8], args.max_length),
    }
    dense = evaluate(model, data)
    print(f"dense: perplexity {dense['perplexity']:.2f}, params {dense['params']}, "
          f"latency {dense['latency_ms']:.1f} ms", flush=True)
    for removed in args.removed:  # the order of --removed: put the most telling fraction first
        for method in args.methods:
            for reweight in (True, False):
                if (method, reweight, removed, args.calib, args.intercept) in done:
                    continue
                keep = 1.0 - removed
                config = TransformerPruneConfig(method=method, heads=keep, ffn=keep, reweight=reweight,
                                                intercept=args.intercept)
                start = time.perf_counter()
                result = prune_transformer(model, data["calibration"], config)
                seconds = time.perf_counter() - start
                row = {"method": method, "reweight": reweight, "removed": removed, "calib": args.calib,
                       "intercept": args.intercept,
                       **evaluate(result.model, data), "dense_perplexity": dense["perplexity"],
                       "dense_params": dense["params"], "dense_latency_ms": dense["latency_ms"],
                       "prune_seconds": seconds}
                print(json.dumps(row), flush=True)
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
    lines = [
        "| removed (heads and FFN) | method | refit | held-out perplexity | params | latency ms |",
        "|---|---|---|---|---|---|",
        f"| 0 | dense | - | {dense['perplexity']:.2f} | {dense['params']:,} | {dense['latency_ms']:.1f} |",
    ]
    for r in sorted(rows, key=lambda r: (r["removed"], r["method"], r.get("intercept", False), not r["reweight"])):
        name = TRANSFORMER_METHODS[r["method"]].name + (" +bias" if r.get("intercept") else "")
        lines.append(f"| {r['removed']:.0%} | {name} | "
                     f"{'yes' if r['reweight'] else 'no'} | {r['perplexity']:.2f} | {r['params']:,} | "
                     f"{r['latency_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")


if __name__ == "__main__":
    main()
