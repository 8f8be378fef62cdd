"""Prune all-MiniLM-L6-v2's attention heads and FFN neurons on Wikipedia text, no fine-tuning.

For every method x refit x fraction removed: calibrate on ``--calib`` Wikipedia
passages (gensim test data, no labels), remove the same fraction of heads and of
FFN neurons in every layer, then measure on text never used for calibration:

* cosine of pruned to dense mean-pooled sentence embeddings (``--heldout`` passages
  from the end of the dump);
* 5-fold linear-probe accuracy on the 200 labelled Pang & Lee polarity sentences;
* parameters and median CPU latency of one batch (8 passages x 128 tokens, 1 thread).

Rows are appended to a JSON-lines file; finished runs are skipped when run again.
A markdown table is printed and written with ``--table``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_prune.py \
        --out results/minilm.jsonl --table results/minilm.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from subprune.evaluate import count_parameters, measure_latency
from subprune.hf.evaluate import embedding_cosine, linear_probe_accuracy, sentence_embeddings
from subprune.hf.models import load_minilm
from subprune.hf.prune import TRANSFORMER_METHODS, TransformerPruneConfig, prune_transformer
from subprune.hf.text import polarity_sentences, split_passages, tokenize, wikipedia_passages


def run_key(row: dict) -> tuple:
    return (row["method"], row["reweight"], row["removed"], row["calib"], row.get("intercept", False),
            row.get("ridge", 0.0))


def evaluate(model, data: dict) -> dict:
    emb = sentence_embeddings(model, data["heldout"])
    probe = linear_probe_accuracy(sentence_embeddings(model, data["polarity"]), data["labels"])
    latency = measure_latency(model, data["latency"]["input_ids"], repeats=10, warmup=2)
    return {"embeddings": emb, "probe": probe, "params": count_parameters(model), "latency_ms": 1e3 * latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/minilm.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--methods", nargs="+", default=["asym", "magnitude", "wanda", "flap"],
                        choices=sorted(TRANSFORMER_METHODS))
    parser.add_argument("--removed", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--calib", type=int, default=64, help="calibration passages")
    parser.add_argument("--heldout", type=int, default=128, help="held-out passages for the cosine")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ridge", type=float, default=0.0, help="relative ridge of the solver and the refit")
    parser.add_argument("--intercept", action="store_true",
                        help="also refit the consumer bias (TransformerPruneConfig.intercept); rows marked +bias")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {run_key(r) for r in rows}
    model, tokenizer = load_minilm()
    calib_text, heldout_text = split_passages(wikipedia_passages(), args.calib, args.heldout)
    sentences, labels = polarity_sentences()
    data = {
        "calibration": tokenize(tokenizer, calib_text, args.max_length),
        "heldout": tokenize(tokenizer, heldout_text, args.max_length),
        "polarity": tokenize(tokenizer, sentences, args.max_length),
        "labels": labels,
        "latency": tokenize(tokenizer, heldout_text[:8], args.max_length),
    }
    dense = evaluate(model, data)
    print(f"dense: probe {dense['probe']:.3f}, params {dense['params']}, latency {dense['latency_ms']:.1f} ms")
    for removed in args.removed:  # the order of --removed: put the most telling fraction first
        for method in args.methods:
            for reweight in (True, False):
                key = (method, reweight, removed, args.calib, args.intercept, args.ridge)
                if key in done:
                    continue
                keep = 1.0 - removed
                config = TransformerPruneConfig(method=method, heads=keep, ffn=keep, reweight=reweight,
                                                intercept=args.intercept, ridge=args.ridge)
                start = time.perf_counter()
                result = prune_transformer(model, data["calibration"], config)
                seconds = time.perf_counter() - start
                metrics = evaluate(result.model, data)
                row = {
                    "method": method, "reweight": reweight, "removed": removed, "calib": args.calib,
                    "intercept": args.intercept, "ridge": args.ridge,
                    "cosine": embedding_cosine(dense["embeddings"], metrics["embeddings"]),
                    "probe": metrics["probe"], "dense_probe": dense["probe"],
                    "params": metrics["params"], "dense_params": dense["params"],
                    "latency_ms": metrics["latency_ms"], "dense_latency_ms": dense["latency_ms"],
                    "prune_seconds": seconds,
                    "mean_objective": sum(s.objective for s in result.sites) / len(result.sites),
                }
                print(json.dumps(row), flush=True)
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
    table = markdown_table(rows, dense)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")


def markdown_table(rows: list[dict], dense: dict) -> str:
    lines = [
        "| removed (heads and FFN) | method | refit | calib | ridge | embedding cosine | probe acc. | params "
        "| latency ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | - | - | - | 1.0000 | {dense['probe']:.3f} | {dense['params']:,} | {dense['latency_ms']:.1f} |",
    ]
    for r in sorted(rows, key=lambda r: (r["removed"], r["method"], r.get("intercept", False), r["calib"],
                                         r.get("ridge", 0.0), not r["reweight"])):
        name = TRANSFORMER_METHODS[r["method"]].name + (" +bias" if r.get("intercept") else "")
        lines.append(f"| {r['removed']:.0%} | {name} | {'yes' if r['reweight'] else 'no'} | {r['calib']} | "
                     f"{r.get('ridge', 0.0):g} | {r['cosine']:.4f} | "
                     f"{r['probe']:.3f} | {r['params']:,} | {r['latency_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
