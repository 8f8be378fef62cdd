"""Why pruning SmolLM2-135M collapses: per-block errors, how they compound, and the usual suspects, in numbers.

For each variant (see ``benchmarks/llm_sweep.py`` for the syntax), prune with the
library at a fraction of the prunable parameters, then run held-out Wikipedia
passages through the dense and the pruned model side by side with hooks on
every block and print, per block:

* ``f(heads)``, ``f(ffn)``: the method's own objective of the block's two sites
  (kept share of the consumer output energy, on the calibration statistics);
* ``local``: relative error of the block's contribution to the residual stream
  when the pruned block gets the dense block's input,
  ||B_p(h) - B_d(h)|| / ||B_d(h) - h||;
* ``stream``: relative error of the block output in the pruned model vs the
  dense model, ||h_p - h_d|| / ||h_d|| (what compounds), and the same without
  the 3 hidden dimensions of largest dense activation (``stream-3``).

Then the suspects, on the dense calibration statistics: the share of each
site's output energy ||A W||^2 in its top 1 and top 5 output (hidden) dimensions
(massive features), the residual stream's largest activations, tokens vs refit
columns and the condition number of G_SS at the kept sets (with and without a
ridge), the float32-vs-float64 Gram error, and the key/value-group unit.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_diagnose.py --calib 32 \\
        --variants asym seq layer flap wanda-sp --removed 0.5 --out results/llm_diagnose.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_sweep import SharedStatistics, Variant, calibration, load_model  # noqa: E402

import subprune.hf.prune as prune_module  # noqa: E402
from subprune.hf.architectures import HEADS, blocks, consumer_weight, find_transformer_sites  # noqa: E402
from subprune.hf.evaluate import perplexity  # noqa: E402
from subprune.hf.prune import prune_transformer  # noqa: E402
from subprune.hf.text import tokenize, wikipedia_passages  # noqa: E402
from subprune.solver import group_columns, ridge_value  # noqa: E402
from subprune.surgery import get_module  # noqa: E402

HELDOUT = 16  # held-out passages for the block errors (the last ones of the dump)


@torch.no_grad()
def block_errors(dense, pruned, tokens) -> list[dict]:
    """Per block: local error of the block's contribution and stream error of its output, over real tokens."""
    _, dense_layers = blocks(dense)
    _, pruned_layers = blocks(pruned)
    n = len(dense_layers)
    captured: dict[int, tuple] = {}
    outs_d: dict[int, torch.Tensor] = {}
    outs_p: dict[int, torch.Tensor] = {}
    handles = []
    for i in range(n):
        handles.append(dense_layers[i].register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: captured.__setitem__(i, (args, kwargs)), with_kwargs=True))
        handles.append(dense_layers[i].register_forward_hook(
            lambda mod, args, out, i=i: outs_d.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())))
        handles.append(pruned_layers[i].register_forward_hook(
            lambda mod, args, out, i=i: outs_p.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())))
    real = tokens["attention_mask"].bool()
    try:
        dense(**tokens, use_cache=False)  # no KV cache: the captured block inputs are re-run below
        pruned(**tokens, use_cache=False)
        massive = outs_d[n - 2][real].abs().amax(0).topk(3).indices  # (3,) dims of largest activation
        rows = []
        for i in range(n):
            args, kwargs = captured[i]
            h_in = args[0]
            local_out = pruned_layers[i](*args, **kwargs)
            local_out = local_out[0] if isinstance(local_out, tuple) else local_out
            contribution = (outs_d[i] - h_in)[real]
            local = float((local_out[real] - outs_d[i][real]).norm() / contribution.norm())
            diff = (outs_p[i] - outs_d[i])[real]
            keep_dims = torch.ones(diff.shape[1], dtype=torch.bool)
            keep_dims[massive] = False
            rows.append({
                "block": i, "local": local,
                "local_vs_stream": float((local_out[real] - outs_d[i][real]).norm() / outs_d[i][real].norm()),
                "stream": float(diff.norm() / outs_d[i][real].norm()),
                "stream-3": float(diff[:, keep_dims].norm() / outs_d[i][real][:, keep_dims].norm()),
                "max_abs": float(outs_d[i][real].abs().max()),
                "median_abs": float(outs_d[i][real].abs().median()),
            })
    finally:
        for h in handles:
            h.remove()
    return rows, massive.tolist()


def suspects(model, calib, kept: dict[str, list[int]], ridge: float) -> list[dict]:
    """Massive-feature energy shares, refit conditioning and Gram precision per site, from dense statistics."""
    sites = find_transformer_sites(model)
    stats = prune_module.collect_transformer_statistics(model, sites, calib, batch_size=16)
    rows = []
    for site in sites:
        s = stats[site.name]
        g = s.gram.gram_
        w = consumer_weight(get_module(model, site.consumer)).to(g)  # (d, m)
        per_dim = (w * (g @ w)).sum(0)  # (m,) energy per output (hidden) dimension
        share = per_dim.sort(descending=True).values / per_dim.sum()
        ev_all = torch.linalg.eigvalsh(g)
        row = {"site": site.name, "tokens": s.gram.n_rows_, "columns": g.shape[0],
               "top1_share": float(share[0]), "top5_share": float(share[:5].sum()),
               "top_dim": int(per_dim.argmax()), "cond_G": float(ev_all[-1] / ev_all[0].clamp_min(1e-300))}
        if site.name in kept:
            cols = group_columns(torch.tensor(kept[site.name]), site.group_size)
            g_ss = g[cols][:, cols]
            ev = torch.linalg.eigvalsh(g_ss)
            lam = ridge_value(g, ridge) if ridge else ridge_value(g, 1e-3)
            row.update({"kept_columns": cols.numel(), "cond": float(ev[-1] / ev[0].clamp_min(1e-300)),
                        "cond_ridge": float((ev[-1] + lam) / (ev[0] + lam))})
        rows.append(row)
    return rows


@torch.no_grad()
def gram_precision(model, calib, site, k: int) -> dict:
    """A float32-accumulated Gram vs the float64 one on one site: relative error, greedy choices, f(S_k)."""
    from subprune.solver_factored import greedy_select_factored

    consumer = get_module(model, site.consumer)
    d = consumer_weight(consumer).shape[0]
    g32, g64 = torch.zeros(d, d), torch.zeros(d, d, dtype=torch.float64)

    def hook(module, inputs):
        x = inputs[0].reshape(-1, d)[mask.reshape(-1)]
        g32.addmm_(x.T.float(), x.float())
        g64.addmm_(x.T.double(), x.double())

    handle = consumer.register_forward_pre_hook(hook)
    try:
        for start in range(0, calib["input_ids"].shape[0], 16):
            batch = {key: v[start : start + 16] for key, v in calib.items()}
            mask = batch["attention_mask"].bool()
            model(**batch)
    finally:
        handle.remove()
    w = consumer_weight(consumer).double()
    runs = {}
    for label, g in (("float64", g64), ("float32", g32.double())):
        energy = float((w * (g64 @ w)).sum())
        runs[label] = greedy_select_factored(g, w, energy, site.group_size, k)
    same = len(set(runs["float64"].keep(k).tolist()) & set(runs["float32"].keep(k).tolist()))
    return {"site": site.name, "rel_error": float((g32.double() - g64).norm() / g64.norm()), "k": k,
            "same_choices": same, "f64": float(runs["float64"].objective[-1]),
            "f32": float(runs["float32"].objective[-1]),
            "eig_min_over_max": float(torch.linalg.eigvalsh(g64)[0] / torch.linalg.eigvalsh(g64)[-1])}


@torch.no_grad()
def first_token_share(model, calib) -> dict[str, float]:
    """Per site: share of the consumer output energy ||A W||^2 that comes from the first token of each passage."""
    sites = find_transformer_sites(model)
    first, total = {s.name: 0.0 for s in sites}, {s.name: 0.0 for s in sites}
    handles = []
    for site in sites:
        consumer = get_module(model, site.consumer)

        def hook(module, inputs, output, name=site.name):
            y = output.double()  # (B, T, m), the consumer output (bias-free on LLaMA)
            e = (y.square().sum(-1) * mask).sum(0)  # (T,) energy per position over real tokens
            first[name] += float(e[0])
            total[name] += float(e.sum())

        handles.append(consumer.register_forward_hook(hook))
    try:
        for start in range(0, calib["input_ids"].shape[0], 16):
            batch = {key: v[start : start + 16] for key, v in calib.items()}
            mask = batch["attention_mask"].double()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: first[name] / max(total[name], 1e-300) for name in first}


def rows_report(paths: list[str], removed: float, seed: int, command: str) -> str:
    """Per-block tables and a compounding summary from sweep rows with ``blocks`` (``llm_sweep.py --diagnose``)."""
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    rows = [r for r in rows if r.get("blocks") and r["removed"] == removed and r["seed"] == seed]
    if not rows:
        raise SystemExit(f"no rows with per-block errors at removed={removed}, seed={seed} in {paths}")
    calib = rows[0]["calib"]
    lines = [f"Command: `{command}`", "",
             f"SmolLM2-135M, {removed:.0%} of the prunable parameters removed, {calib} calibration passages (seed "
             f"{seed}); block errors on {HELDOUT} held-out Wikipedia passages (the last of the dump), perplexity on "
             "the sweep's held-out sets. local = ||B_p(h) - B_d(h)|| / ||B_d(h) - h|| with the dense input h; "
             "stream = ||h_p - h_d|| / ||h_d|| of the block output; stream-3 = the same without the 3 hidden "
             f"dimensions of largest dense activation ({rows[0].get('massive_dims')}). f = the site objective on the "
             "calibration statistics (the method's own target; nan: the site is kept whole).", "",
             "### Compounding: stream-3 error of the block output, and mean local error", "",
             "| variant | Wikipedia ppl | news ppl | mean local | stream-3 @ block 0 | 5 | 10 | 15 | 20 | 25 | 29 | "
             "final stream |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["wiki_ppl"]):
        b = r["blocks"]
        mean_local = sum(e["local"] for e in b) / len(b)
        lines.append(f"| {r['variant']} | {r['wiki_ppl']:,.1f} | {r['lee_ppl']:,.1f} | {mean_local:.3f} | " +
                     " | ".join(f"{b[i]['stream-3']:.3f}" for i in (0, 5, 10, 15, 20, 25, 29)) +
                     f" | {b[-1]['stream']:.3f} |")
    for r in sorted(rows, key=lambda r: r["wiki_ppl"]):
        f, kept = r["objective"], r["kept"]
        lines += ["", f"### {r['variant']}: Wikipedia perplexity {r['wiki_ppl']:,.1f}, news {r['lee_ppl']:,.1f}", "",
                  "| block | kept heads | f(heads) | kept ffn | f(ffn) | local | stream | stream-3 |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in r["blocks"]:
            i = e["block"]
            h, m = f"model.layers.{i}.heads", f"model.layers.{i}.ffn"
            lines.append(f"| {i} | {kept.get(h, 'all')} | {f.get(h, float('nan')):.3f} | {kept.get(m, 'all')} | "
                         f"{f.get(m, float('nan')):.3f} | {e['local']:.3f} | {e['stream']:.3f} | "
                         f"{e['stream-3']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=["asym", "seq", "layer", "flap", "wanda-sp"],
                        help="variants to prune and trace; none: only the dense-model suspects")
    parser.add_argument("--removed", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/llm_diagnose.md")
    parser.add_argument("--json", default=None, help="also write every number as JSON here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only tabulate sweep rows with per-block errors (llm_sweep.py --diagnose) into --out")
    args = parser.parse_args()
    if args.rows:
        command = f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_diagnose.py {' '.join(sys.argv[1:])}"
        Path(args.out).write_text(rows_report(args.rows, args.removed, args.seed, command))
        return
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    passages = wikipedia_passages()
    calib = calibration(tokenizer, passages, args.calib, args.seed)
    heldout = tokenize(tokenizer, passages[-HELDOUT:], 128)
    report = {"variants": {}}
    SharedStatistics()  # the dense statistics of the calibration draw, computed once for every variant that reads them
    lines = [f"Command: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_diagnose.py "
             f"{' '.join(sys.argv[1:])}`", "",
             f"SmolLM2-135M, {args.removed:.0%} of the prunable parameters removed, {args.calib} calibration "
             f"passages (seed {args.seed}); block errors on {HELDOUT} held-out Wikipedia passages.", ""]
    kept_of_first = None
    for spec in args.variants:
        variant = Variant.parse(spec)
        start = time.perf_counter()
        result = prune_transformer(model, calib, variant.config(args.removed, args.seed))
        seconds = time.perf_counter() - start
        errors, massive = block_errors(model, result.model, heldout)
        f = {s.name: s.objective for s in result.sites}
        kept = {s.name: s.keep for s in result.sites}
        kept_of_first = kept_of_first or kept
        ppl = perplexity(result.model, tokenize(tokenizer, passages[-64:], 128))  # the sweep's 64 passages
        report["variants"][spec] = {"errors": errors, "f": f, "kept": kept, "perplexity": ppl, "seconds": seconds}
        prefix = blocks(model)[0]
        lines += [f"### {spec}: held-out Wikipedia perplexity {ppl:,.1f} (prune {seconds:.0f} s)", "",
                  "| block | kept heads | f(heads) | kept ffn | f(ffn) | local | stream | stream-3 |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in errors:
            i = e["block"]
            h, m = f"{prefix}.{i}.heads", f"{prefix}.{i}.ffn"
            lines.append(f"| {i} | {len(kept.get(h, [])) or 'all'} | {f.get(h, float('nan')):.3f} | "
                         f"{len(kept.get(m, [])) or 'all'} | {f.get(m, float('nan')):.3f} | {e['local']:.3f} | "
                         f"{e['stream']:.3f} | {e['stream-3']:.3f} |")
        lines.append("")
        print("\n".join(lines[-len(errors) - 5:]), flush=True)
    if not args.variants:  # the dense model against itself: the activation statistics of every block
        errors, massive = block_errors(model, model, heldout)
    report["massive_dims"] = massive
    dense_rows = errors  # max/median from the last run's dense pass (the same dense model every time)
    lines += ["### Massive residual features (dense model, held-out)", "",
              f"Hidden dimensions of largest activation: {massive}. Per block: max |h| / median |h|: " +
              ", ".join(f"{r['block']}: {r['max_abs']:.0f}/{r['median_abs']:.2f}" for r in dense_rows), ""]
    sus = suspects(model, calib, kept_of_first or {}, 0.0)
    report["suspects"] = sus
    lines += ["### Site statistics (dense, calibration): energy share of the top output dims, refit conditioning "
              f"at the kept sets of {args.variants[0] if args.variants else '-'}", "",
              "| site | tokens | columns | kept cols | top-1 dim share | top-5 share | top dim | cond G | cond G_SS | "
              "cond, ridge 1e-3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sus:
        lines.append(f"| {r['site']} | {r['tokens']} | {r['columns']} | {r.get('kept_columns', '-')} | "
                     f"{r['top1_share']:.3f} | {r['top5_share']:.3f} | {r['top_dim']} | {r['cond_G']:.2e} | "
                     f"{r.get('cond', float('nan')):.2e} | {r.get('cond_ridge', float('nan')):.2e} |")
    sites = find_transformer_sites(model)
    sink = first_token_share(model, calib)
    report["first_token_share"] = sink
    n_tokens = int(calib["attention_mask"].sum())
    lines += ["", f"First token of each passage ({calib['input_ids'].shape[0]} of {n_tokens} calibration tokens): "
              "share of the consumer output energy ||A W||^2 per site: " +
              ", ".join(f"{name.split('.', 2)[-1]}: {v:.2f}" for name, v in sink.items()), ""]
    ffn_site = next(s for s in sites if s.kind != HEADS)
    precision = gram_precision(model, calib, ffn_site, ffn_site.channels // 2)
    report["precision"] = precision
    lines += ["", f"Gram precision ({precision['site']}): a float32 running sum differs from the float64 one by "
              f"{precision['rel_error']:.1e} (relative Frobenius); greedy to k = {precision['k']} on it keeps "
              f"{precision['same_choices']}/{precision['k']} of the same neurons, f(S) {precision['f32']:.5f} vs "
              f"{precision['f64']:.5f}; smallest/largest eigenvalue of G {precision['eig_min_over_max']:.1e}.", ""]
    heads = [s for s in sites if s.kind == HEADS]
    lines += [f"Attention unit: {heads[0].channels} key/value groups per layer, each {heads[0].group_size} "
              f"output-projection columns ({heads[0].group_size // heads[0].head_dim} query heads).", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n".join(lines[-len(sus) - 12:]))


if __name__ == "__main__":
    main()
