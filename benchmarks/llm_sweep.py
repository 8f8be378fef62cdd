"""Prune SmolLM2-135M with subprune's methods and the LLM baselines; held-out perplexity on two texts.

One JSON line per run (resumable: a row whose key is in ``--out`` is skipped).
A run = a variant x a fraction of the prunable (attention + FFN) parameters
removed x a calibration seed. The calibration passages are drawn at random (the
seed) from the Wikipedia passages before the last 256; perplexity is measured on
the last 128 Wikipedia passages and on the first 64 articles of gensim's
``lee_background.cor`` (news, another source), each cut to 128 tokens, never
calibrated on. Also: parameters, prune seconds, decode tokens/s (greedy, batch
1, 32 new tokens, median of 3) and the per-site f(S).

A variant is ``METHOD[/BUDGET][/refit|/norefit][/rRIDGE][/heads|/ffn][/qheads][/residual][@REMOVED]``, e.g.
``flap`` (FLAP as published: its own adaptive structure, bias compensation, no
refit), ``wanda-sp/norefit``, ``layer/flap/refit/r1e-3`` (LayerInChange with
FLAP's structure and a ridge), ``layer/curve/refit/ffn`` (FFN only), ``layer/flap/qheads``
(query heads as attention units), ``asym/flap/residual`` (the residual-stream target),
``layer/heads@0.5`` (only at 50% of the ``--removed`` fractions).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_sweep.py \\
        --variants flap wanda-sp layer/flap/refit/r1e-3 --removed 0.2 0.5 --seeds 0 1 2 --calib 128 \\
        --out results/llm_sweep.jsonl --table results/llm_sweep.md --plot results/llm_sweep.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from subprune.evaluate import count_parameters
from subprune.hf.evaluate import perplexity
from subprune.hf.prune import BUDGETS, INCHANGE, TRANSFORMER_METHODS, TransformerPruneConfig, prune_transformer
from subprune.hf.text import gensim_test_data, tokenize, wikipedia_passages

CALIB_POOL_END = 256  # calibration passages come from before the last 256 Wikipedia passages
WIKI_HELDOUT = 128  # the last 128 passages
LEE_HELDOUT = 64  # the first 64 news articles of lee_background.cor
MAX_LENGTH = 128


@dataclass(frozen=True)
class Variant:
    """One row label of the sweep: a method, its budget rule, refit or not, a ridge, the kinds pruned."""

    spec: str
    method: str
    budget: str = "auto"
    reweight: bool | None = None  # None: the method's default (refit for the InChange methods and their -swap)
    ridge: float = 0.0
    kinds: str = "both"  # both, heads, ffn
    units: str = "kv"  # attention units: kv groups, or query heads (qheads)
    target: str = "sublayer"  # what a consumer fits: its sublayer output, or plus the upstream residual error
    only_removed: float | None = None  # ``SPEC@0.5``: run at this fraction of --removed only

    @classmethod
    def parse(cls, spec: str) -> Variant:
        spec, _, at = spec.partition("@")
        kwargs: dict = {"only_removed": float(at)} if at else {}
        method, *parts = spec.split("/")
        if method not in TRANSFORMER_METHODS:
            raise SystemExit(f"variant {spec!r}: unknown method {method!r}; choose one of {list(TRANSFORMER_METHODS)}")
        for part in parts:
            if part in BUDGETS:
                kwargs["budget"] = part
            elif part in ("refit", "norefit"):
                kwargs["reweight"] = part == "refit"
            elif part in ("heads", "ffn"):
                kwargs["kinds"] = part
            elif part == "qheads":
                kwargs["units"] = part
            elif part == "residual":
                kwargs["target"] = part
            elif part.startswith("r"):
                kwargs["ridge"] = float(part[1:])
            else:
                raise SystemExit(f"variant {spec!r}: cannot read {part!r} (a budget {BUDGETS}, refit/norefit, "
                                 "rRIDGE, heads, ffn, qheads or residual)")
        return cls(spec, method, **kwargs)

    def config(self, removed: float, seed: int) -> TransformerPruneConfig:
        reweight = self.reweight if self.reweight is not None else self.method in INCHANGE  # *-swap refit too
        return TransformerPruneConfig(
            method=self.method, heads=None if self.kinds == "ffn" else 0.5, ffn=None if self.kinds == "heads" else 0.5,
            params=1.0 - removed, budget=self.budget, reweight=reweight, ridge=self.ridge, seed=seed, batch_size=16,
            units=self.units, target=self.target,
        )


class SharedStatistics:
    """Compute the dense statistics of one calibration draw once and hand them to every variant that reads them.

    ``prune_transformer`` collects the dense model's statistics for the
    methods and budgets that read them (Layer*, FLAP, Wanda-sp, the flap and
    curve budgets); the variants of one draw would collect the same sums again.
    This wraps :func:`subprune.hf.prune.collect_transformer_statistics` with a
    cache keyed by the calibration tensor and the consumers, so a draw pays one
    pass; rows pruned from the cache say so (``stats_cached``), and their prune
    seconds leave that pass out. Sequential methods do not read it.
    """

    def __init__(self) -> None:
        import subprune.hf.prune as prune_module

        self.module, self.original = prune_module, prune_module.collect_transformer_statistics
        self.cache: dict = {}  # (calibration, consumer) -> SiteMoments: a consumer's input is the same for any site
        self.hit = False
        prune_module.collect_transformer_statistics = self

    def __call__(self, model, sites, calibration, **kwargs):
        keys = [(id(calibration["input_ids"]), s.consumer) for s in sites]
        missing = [s for s, key in zip(sites, keys, strict=True) if key not in self.cache]
        self.hit = not missing  # heads-only, FFN-only and query-head runs read a subset of a full run's sums
        if missing:
            stats = self.original(model, missing, calibration, **kwargs)
            self.cache.update({(id(calibration["input_ids"]), s.consumer): stats[s.name] for s in missing})
        return {s.name: self.cache[key] for s, key in zip(sites, keys, strict=True)}

    def reset(self) -> None:
        self.cache.clear()


def lee_articles() -> list[str]:
    """The news articles of gensim's ``lee_background.cor``, one a line."""
    text = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_model():
    from subprune.hf.smollm2 import load_smollm2

    return load_smollm2()


@torch.no_grad()
def decode_tokens_per_second(model, tokenizer, new_tokens: int = 32, rounds: int = 3) -> float:
    """Median tokens/s of greedy decoding, batch 1, ``new_tokens`` after a short prompt."""
    ids = tokenizer("The history of the city begins", return_tensors="pt")["input_ids"]
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times[1:])


def evaluate(model, tokenizer, data: dict, decode: bool = True) -> dict:
    return {"wiki_ppl": perplexity(model, data["wiki"]), "lee_ppl": perplexity(model, data["lee"]),
            "params": count_parameters(model),
            "decode_tps": decode_tokens_per_second(model, tokenizer) if decode else float("nan")}


def calibration(tokenizer, passages: list[str], n: int, seed: int) -> dict:
    pool = passages[: len(passages) - CALIB_POOL_END]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return tokenize(tokenizer, [pool[i] for i in sorted(pick.tolist())], MAX_LENGTH)


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:,.1f}"
    return f"{mean:,.1f} ± {statistics.stdev(values):,.1f}"


def table(rows: list[dict], dense: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"SmolLM2-135M-Instruct (Q4_1 dequantised to float32), dense: Wikipedia perplexity "
             f"{dense['wiki_ppl']:.2f}, news (lee) {dense['lee_ppl']:.2f}, {dense['params']:,} parameters, "
             f"{dense['decode_tps']:.1f} decode tokens/s. Mean ± std over calibration seeds (n = seeds); prune "
             "seconds of runs that collected their own statistics, and of runs that took them from the "
             "`--share-statistics` cache (selection, refit and surgery only).", "",
             "| removed | variant | n | Wikipedia ppl | news ppl | params | prune s | prune s, shared stats | "
             "prune CPU s | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["removed"], r["variant"], r["calib"]), []).append(r)
    for (removed, variant, calib), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2],
                                                statistics.fmean(r["wiki_ppl"] for r in kv[1]))):
        lines.append(f"| {removed:.0%} | {variant} (calib {calib}) | {len(rs)} | {fmt([r['wiki_ppl'] for r in rs])} "
                     f"| {fmt([r['lee_ppl'] for r in rs])} | {statistics.fmean(r['params'] for r in rs):,.0f} | "
                     f"{fmt([r['prune_seconds'] for r in rs if not r.get('stats_cached')])} | "
                     f"{fmt([r['prune_seconds'] for r in rs if r.get('stats_cached')])} | "
                     f"{fmt([r['prune_cpu_seconds'] for r in rs if 'prune_cpu_seconds' in r])} | "
                     f"{fmt([r['decode_tps'] for r in rs if r['decode_tps'] == r['decode_tps']])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, ref in ((axes[0], "wiki_ppl", "held-out Wikipedia", dense["wiki_ppl"]),
                                (axes[1], "lee_ppl", "news (lee_background)", dense["lee_ppl"])):
        variants = sorted({(r["variant"], r["calib"]) for r in rows})
        for variant, calib in variants:
            pts = sorted({r["removed"] for r in rows if (r["variant"], r["calib"]) == (variant, calib)})
            means = [statistics.fmean(r[key] for r in rows if (r["variant"], r["calib"], r["removed"])
                                      == (variant, calib, p)) for p in pts]
            ax.plot([100 * p for p in pts], means, marker="o", label=f"{variant} ({calib})")
        ax.axhline(ref, color="k", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("% of prunable parameters removed")
        ax.set_ylabel(f"perplexity, {label}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--removed", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--out", default="results/llm_sweep.jsonl")
    parser.add_argument("--table", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="more JSON-lines files of the same protocol (other seeds run in parallel) for the table; "
                        "their runs are not run again")
    parser.add_argument("--wiki-heldout", type=int, default=WIKI_HELDOUT, help="held-out Wikipedia passages")
    parser.add_argument("--lee-heldout", type=int, default=LEE_HELDOUT, help="held-out news articles")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode tokens/s measurement")
    parser.add_argument("--share-statistics", action="store_true",
                        help="dense statistics of a calibration draw computed once for all variants")
    parser.add_argument("--diagnose", action="store_true",
                        help="per-block local and stream errors on held-out text in every row (llm_diagnose.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [Variant.parse(v) for v in args.variants]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if args.table_only and dense is not None:
        model = tokenizer = None
    else:
        model, tokenizer = load_model()
    passages = wikipedia_passages()
    if tokenizer is not None:
        data = {"wiki": tokenize(tokenizer, passages[-args.wiki_heldout:], MAX_LENGTH),
                "lee": tokenize(tokenizer, lee_articles()[: args.lee_heldout], MAX_LENGTH)}
    if dense is None:
        dense = {"variant": "dense", **evaluate(model, tokenizer, data, not args.no_decode)}
        with out.open("a") as handle:
            handle.write(json.dumps(dense) + "\n")
        rows.append(dense)
    print(f"dense: {dense}", flush=True)
    merged = [json.loads(line) for extra in args.merge for line in Path(extra).read_text().splitlines()]
    done = {(r["variant"], r["removed"], r["seed"], r["calib"]) for r in rows + merged if r["variant"] != "dense"}
    shared = SharedStatistics() if args.share_statistics else None
    for seed in [] if args.table_only else args.seeds:
        calib = calibration(tokenizer, passages, args.calib, seed)
        if shared is not None:
            shared.reset()
        for removed in args.removed:
            for variant in variants:
                if args.table_only or (variant.spec, removed, seed, args.calib) in done or \
                        variant.only_removed not in (None, removed):
                    continue
                if shared is not None:
                    shared.hit = False
                load = os.getloadavg()[0]
                start, cpu_start = time.perf_counter(), time.process_time()
                result = prune_transformer(model, calib, variant.config(removed, seed))
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                row = {"variant": variant.spec, "removed": removed, "seed": seed, "calib": args.calib,
                       "stats_cached": bool(shared is not None and shared.hit),
                       **evaluate(result.model, tokenizer, data, not args.no_decode), "prune_seconds": seconds,
                       "prune_cpu_seconds": cpu_seconds, "load_at_start": load,
                       "objective": {s.name: round(s.objective, 5) for s in result.sites},
                       "kept": {s.name: s.kept for s in result.sites}}
                if args.diagnose:
                    from llm_diagnose import HELDOUT, block_errors

                    heldout = tokenize(tokenizer, passages[-HELDOUT:], MAX_LENGTH)
                    row["blocks"], row["massive_dims"] = block_errors(model, result.model, heldout)
                print(json.dumps({k: v for k, v in row.items() if k not in ("objective", "kept", "blocks")}),
                      flush=True)
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                rows.append(row)
    rows = rows + merged  # a run repeated in a later --merge file wins
    latest = {(r["variant"], r["removed"], r["seed"], r["calib"]): r for r in rows if r["variant"] != "dense"}
    runs = list(latest.values())  # a run repeated in a later file (a re-run with more measurements) counts once
    command = "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_sweep.py " + " ".join(sys.argv[1:])
    text = table(runs, dense, command)
    print(text)
    if args.table:
        path = Path(args.table)
        previous = path.read_text() if path.exists() else ""
        header = previous[: previous.find("Command: `")] if previous.find("Command: `") > 0 else ""
        path.write_text(header + text)  # the hand-written part above "Command:" stays
    if args.plot and runs:
        plot(runs, dense, Path(args.plot))


if __name__ == "__main__":
    main()
