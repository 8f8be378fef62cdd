"""Seeded comparison of transformer pruning methods: mean +- std over calibration draws.

For every fraction removed x method x refit x seed: draw ``--calib`` calibration
passages at random (seeded) from the Wikipedia passages that are neither
held out nor the last 256 (never trained on by ``scripts/train_gpt2_wiki.py``),
remove the same fraction of heads and of FFN neurons in every block (or the
curve budget, ``--budgets curve``), and measure on held-out text:

* encoders (all-MiniLM-L6-v2, ``--model minilm``): cosine of pruned to dense
  sentence embeddings on the last 128 passages, 5-fold linear-probe accuracy on
  the 200 labelled polarity sentences;
* causal LMs (``--model PATH``): perplexity on the last 256 passages.

Parameters per run; CPU latency (median of 10 passes, 8 passages x 128 tokens,
1 thread) once per pruned shape (it depends only on the widths, and one
measurement per shape keeps the noise of a shared machine out of the method
comparison). Rows go to a JSON-lines file (resumable); the markdown table
gives mean +- std over seeds.

    HF_HUB_OFFLINE=1 python benchmarks/transformer_seeds.py --model minilm --seeds 0 1 2 \
        --out results/minilm_seeds.jsonl --table results/minilm_seeds.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from subprune.evaluate import count_parameters, measure_latency
from subprune.hf.architectures import widths
from subprune.hf.evaluate import embedding_cosine, linear_probe_accuracy, perplexity, sentence_embeddings
from subprune.hf.models import load_minilm, load_transformer
from subprune.hf.prune import TRANSFORMER_METHODS, TransformerPruneConfig, prune_transformer
from subprune.hf.text import polarity_sentences, tokenize, wikipedia_passages

NOT_CALIBRATION = 256  # the last passages: held out of calibration (and of the decoder's training)


def run_key(row: dict) -> tuple:
    return (row["method"], row["reweight"], row["removed"], row["calib"], row["seed"], row["budget"],
            row.get("ridge", 0.0))


def calibration_text(passages: list[str], n: int, seed: int) -> list[str]:
    """``n`` passages drawn without replacement (seeded) from all but the last NOT_CALIBRATION."""
    pool = len(passages) - NOT_CALIBRATION
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n]
    return [passages[i] for i in sorted(order.tolist())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, or a causal LM directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", default=None)
    parser.add_argument("--methods", nargs="+", default=["asym", "magnitude", "wanda", "flap"],
                        choices=sorted(TRANSFORMER_METHODS))
    parser.add_argument("--removed", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--refit", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    parser.add_argument("--budgets", nargs="+", default=["uniform"], choices=["uniform", "curve"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calib", type=int, default=64, help="calibration passages")
    parser.add_argument("--ridge", type=float, default=0.0, help="relative ridge of the greedy and the refit")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {run_key(r) for r in rows}
    encoder = args.model == "minilm"
    model, tokenizer = load_minilm() if encoder else load_transformer(args.model, causal_lm=True)
    passages = wikipedia_passages()
    heldout_text = passages[-128:] if encoder else passages[-NOT_CALIBRATION:]
    data = {"heldout": tokenize(tokenizer, heldout_text, args.max_length),
            "latency": tokenize(tokenizer, heldout_text[:8], args.max_length)["input_ids"]}
    if encoder:
        sentences, labels = polarity_sentences()
        data["polarity"], data["labels"] = tokenize(tokenizer, sentences, args.max_length), labels
    latency_of: dict[str, float] = {}

    def evaluate(pruned) -> dict:
        shape = json.dumps(widths(pruned))
        if shape not in latency_of:
            latency_of[shape] = 1e3 * measure_latency(pruned, data["latency"], repeats=10, warmup=2)
        metrics = {"params": count_parameters(pruned), "latency_ms": latency_of[shape]}
        if encoder:
            metrics["embeddings"] = sentence_embeddings(pruned, data["heldout"])
            metrics["probe"] = linear_probe_accuracy(sentence_embeddings(pruned, data["polarity"]), data["labels"])
        else:
            metrics["perplexity"] = perplexity(pruned, data["heldout"])
        return metrics

    dense = evaluate(model)
    summary = {k: v for k, v in dense.items() if k != "embeddings"}
    print(f"dense: {summary}", flush=True)
    # every seed's full method comparison before the next seed: a cut-short sweep still compares methods
    for removed in args.removed:
        for budget in args.budgets:
            for refit in args.refit:
                for seed in args.seeds:
                    for method in args.methods:
                        reweight = refit == "yes"
                        row = {"method": method, "reweight": reweight, "removed": removed, "calib": args.calib,
                               "seed": seed, "budget": budget, "ridge": args.ridge}
                        if run_key(row) in done:
                            continue
                        keep = 1.0 - removed
                        config = TransformerPruneConfig(method=method, heads=keep, ffn=keep, reweight=reweight,
                                                        budget=budget, seed=seed, ridge=args.ridge)
                        calibration = tokenize(tokenizer, calibration_text(passages, args.calib, seed),
                                               args.max_length)
                        start = time.perf_counter()
                        result = prune_transformer(model, calibration, config)
                        row["prune_seconds"] = time.perf_counter() - start
                        metrics = evaluate(result.model)
                        if encoder:
                            row["cosine"] = embedding_cosine(dense["embeddings"], metrics.pop("embeddings"))
                        row.update(metrics)
                        row.update({f"dense_{k}": v for k, v in summary.items()})
                        row["objective_sum"] = sum(s.objective for s in result.sites)
                        row["kept"] = {s.name: s.kept for s in result.sites}
                        row["eval_seconds"] = time.perf_counter() - start - row["prune_seconds"]
                        print(json.dumps(row), flush=True)
                        with out.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        rows.append(row)
    table = markdown_table(rows, summary, encoder)
    print(table)
    if args.table:
        Path(args.table).write_text(table + "\n")


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(rows: list[dict], dense: dict, encoder: bool) -> str:
    """One line per (fraction, budget, method, refit): mean ± sample std over the seeds."""
    measures = [("cosine", "embedding cosine", 4), ("probe", "probe acc.", 3)] if encoder else \
        [("perplexity", "held-out perplexity", 2)]
    head = "| removed (heads and FFN) | budget | method | refit | ridge | calib | seeds | " + \
        " | ".join(label for _, label, _ in measures) + " | params | latency ms |"
    lines = [head, "|" + "---|" * (9 + len(measures))]
    dense_cells = " | ".join("1.0000" if key == "cosine" else f"{dense[key]:.{d}f}" for key, _, d in measures)
    lines.append(f"| 0 | - | dense | - | - | - | - | {dense_cells} | {dense['params']:,} | {dense['latency_ms']:.1f} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["removed"], r["budget"], r["method"], not r["reweight"], r.get("ridge", 0.0), r["calib"])
        groups.setdefault(key, []).append(r)
    for (removed, budget, method, no_refit, ridge, calib), group in sorted(groups.items()):
        cells = " | ".join(_mean_std([r[key] for r in group], d) for key, _, d in measures)
        lines.append(f"| {removed:.0%} | {budget} | {TRANSFORMER_METHODS[method].name} | "
                     f"{'no' if no_refit else 'yes'} | {ridge:g} | {calib} | {len(group)} | {cells} | "
                     f"{group[0]['params']:,} | "
                     f"{statistics.median(r['latency_ms'] for r in group):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
