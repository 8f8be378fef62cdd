"""Do MiniLM's sublayers repair upstream pruning error? The residual-stream test behind AsymInChange vs Seq.

A post-LN BERT block adds each sublayer's output projection to its residual input
r: out = LN(r + F(r)). After earlier sites are pruned, r' = r + dr and the
dense sublayer's output moves by dF = F_dense(r') - F_dense(r). With a perfect
refit of the site:

* AsymInChange reproduces the dense output F_dense(r): the block error before the
  LayerNorm is dr;
* SeqInChange (and the refit of the baselines) reproduces F_dense(r'): the
  error is dr + dF.

So when ||dr + dF|| < ||dr|| (the dense sublayer partly cancels upstream error,
"self-repair") Asym's target throws that correction away. This script prunes
MiniLM (``--method``, 50% of heads and FFN neurons, refit), feeds the pruned
model's residual inputs through the dense sublayers on held-out passages, and
prints per site ||dr||^2, ||dr + dF||^2 / ||dr||^2 and cos(dr, dF) over real tokens.

    HF_HUB_OFFLINE=1 python benchmarks/self_repair.py --method wanda --calib 64
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from subprune.hf.models import load_minilm
from subprune.hf.prune import TRANSFORMER_METHODS, TransformerPruneConfig, prune_transformer
from subprune.hf.text import split_passages, tokenize, wikipedia_passages
from subprune.statistics import capture_inputs


def _run(model, tokens, pre: dict, post: list[str]) -> dict:
    """Forward ``tokens``; ``pre``: module -> tensor replacing its first input; returns outputs of ``post``."""
    outputs, handles = {}, []
    for name, value in pre.items():
        def swap(module, args, kwargs, value=value):
            return (value, *args[1:]), kwargs
        handles.append(model.get_submodule(name).register_forward_pre_hook(swap, with_kwargs=True))
    for name in post:
        def keep(module, args, output, name=name):
            outputs[name] = output.detach()
        handles.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(**tokens)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _inputs(model, tokens, names: list[str]) -> dict:
    inputs: dict = {}
    with torch.no_grad(), capture_inputs({name: model.get_submodule(name) for name in names}, inputs.__setitem__):
        model(**tokens)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="wanda", choices=sorted(TRANSFORMER_METHODS))
    parser.add_argument("--removed", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm()
    calib_text, heldout_text = split_passages(wikipedia_passages(), args.calib, args.heldout)
    keep = 1 - args.removed
    pruned = prune_transformer(model, tokenize(tokenizer, calib_text),
                               TransformerPruneConfig(method=args.method, heads=keep, ffn=keep)).model
    tokens = tokenize(tokenizer, heldout_text)
    real = tokens["attention_mask"].bool()
    n_layers = len(model.encoder.layer)
    norms = {"heads": "attention.output.LayerNorm", "ffn": "output.LayerNorm"}
    names = [f"encoder.layer.{i}" for i in range(n_layers)] + \
        [f"encoder.layer.{i}.intermediate" for i in range(n_layers)] + \
        [f"encoder.layer.{i}.{n}" for i in range(n_layers) for n in norms.values()]
    dense_in, pruned_in = _inputs(model, tokens, names), _inputs(pruned, tokens, names)
    outs = [f"encoder.layer.{i}.attention.output.dense" for i in range(n_layers)] + \
        [f"encoder.layer.{i}.output.dense" for i in range(n_layers)]
    dense_out = _run(model, tokens, {}, outs)
    print(f"method {args.method}, {args.removed:.0%} removed, {args.heldout} held-out passages")
    print("| site | ||dr||^2 / ||r||^2 | ||dr + dF||^2 / ||dr||^2 | cos(dr, dF) | same after the LayerNorm's scaling "
          "(gamma_j / sigma_t) | cos |")
    print("|---|---|---|---|---|---|")
    rows = []
    for i in range(n_layers):
        block, ffn_in = f"encoder.layer.{i}", f"encoder.layer.{i}.intermediate"
        moved = _run(model, tokens, {block: pruned_in[block], ffn_in: pruned_in[ffn_in]},
                     [f"{block}.attention.output.dense", f"{block}.output.dense"])
        for kind, r_name, f_name in (("heads", block, f"{block}.attention.output.dense"),
                                     ("ffn", ffn_in, f"{block}.output.dense")):
            r, dr = dense_in[r_name][real], (pruned_in[r_name] - dense_in[r_name])[real]  # (tokens, hidden)
            d_f = (moved[f_name] - dense_out[f_name])[real]
            base = float(dr.square().sum())
            if base == 0:
                continue
            norm = model.get_submodule(f"{block}.{norms[kind]}")
            sigma = dense_in[f"{block}.{norms[kind]}"][real].var(1, unbiased=False).add(norm.eps).sqrt()  # (tokens,)
            scale = norm.weight.detach().abs() / sigma.unsqueeze(1)  # (tokens, hidden): d LN(x) / dx, diagonal part
            wr, wf = dr * scale, d_f * scale
            row = {"site": f"{block}.{kind}", "relative_dr": base / float(r.square().sum()),
                   "repair_ratio": float((dr + d_f).square().sum()) / base,
                   "cos": float(F.cosine_similarity(dr.flatten(), d_f.flatten(), dim=0)),
                   "repair_ratio_ln": float((wr + wf).square().sum() / wr.square().sum()),
                   "cos_ln": float(F.cosine_similarity(wr.flatten(), wf.flatten(), dim=0))}
            rows.append(row)
            print(f"| {row['site']} | {row['relative_dr']:.4f} | {row['repair_ratio']:.3f} | {row['cos']:.3f} | "
                  f"{row['repair_ratio_ln']:.3f} | {row['cos_ln']:.3f} |", flush=True)
    ratios = [r["repair_ratio_ln"] for r in rows]
    print(f"mean ||dr + dF||^2 / ||dr||^2 after the LayerNorm's scaling: {sum(ratios) / len(ratios):.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
