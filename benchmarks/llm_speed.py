"""Speed of a pruned SmolLM2-135M against the dense model: forward latency and decode tokens/s, interleaved rounds.

The pruned model is a directory written by ``subprune prune --model hf:smollm2-135m --out DIR`` (``--pruned``),
or, by default, pruned here with Wanda at 50% of the prunable parameters from 32 Wikipedia passages (no greedy
solver, so it takes a couple of minutes; the speed depends only on the widths, not on the method). Each round
measures, for the dense and then the pruned model (the order alternates between rounds):

* latency of one forward of 128 tokens at batch 1 and batch 8 (no KV cache, logits included);
* greedy decoding of 64 new tokens after a 16-token prompt at batch 1 (KV cache on): tokens per second.

Medians over the rounds; the ratio dense / pruned (> 1: the pruned model is faster). CPU, fixed thread count.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/llm_speed.py --rounds 5 --json results/llm_speed.json \
        --table results/llm_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from subprune.evaluate import count_parameters
from subprune.hf import TransformerPruneConfig, load_pruned, prune_transformer
from subprune.hf.smollm2 import load_smollm2
from subprune.hf.text import tokenize, wikipedia_passages

COMMAND = ("OMP_NUM_THREADS=2 .venv/bin/python benchmarks/llm_speed.py --rounds 5 --json results/llm_speed.json "
           "--table results/llm_speed.md")


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU (all threads) seconds of one forward."""
    start, cpu = time.perf_counter(), time.process_time()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start, time.process_time() - cpu


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, pad: int) -> tuple[float, float]:
    """Generated tokens per wall-clock second and per CPU second."""
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    generated = out.shape[1] - prompt.shape[1]
    return generated / (time.perf_counter() - start), generated / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", default=None, help="a directory written by subprune prune (default: prune here)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_smollm2()
    passages = wikipedia_passages()
    if args.pruned:
        import transformers

        pruned = load_pruned(args.pruned, transformers.AutoModelForCausalLM)
        how = f"loaded from {args.pruned}"
    else:
        config = TransformerPruneConfig(method="wanda", heads=0.5, ffn=0.5, params=0.5)
        pruned = prune_transformer(dense, tokenize(tokenizer, passages[:32]), config).model
        how = "Wanda, 50% of the prunable parameters, 32 calibration passages"
    pruned.eval()
    ids = tokenize(tokenizer, passages[-8:], max_length=128)["input_ids"]
    if ids.shape[1] < 128:
        raise ValueError("the held-out passages are shorter than 128 tokens")
    batch1, batch8, prompt = ids[:1, :128], ids[:8, :128], ids[:1, :16]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    models = {"dense": dense, "pruned": pruned}
    for model in models.values():  # warm-up
        forward_seconds(model, batch1)
        decode_tokens_per_second(model, prompt, 4, pad)
    keys = ("forward_b1_ms", "forward_b8_ms", "decode_tok_s")
    measures = {name: {k + suffix: [] for k in keys for suffix in ("", "_cpu")} for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            model, m = models[name], measures[name]
            for label, batch in (("forward_b1_ms", batch1), ("forward_b8_ms", batch8)):
                wall, cpu = forward_seconds(model, batch)
                m[label].append(1e3 * wall)
                m[label + "_cpu"].append(1e3 * cpu)
            wall, cpu = decode_tokens_per_second(model, prompt, args.new_tokens, pad)
            m["decode_tok_s"].append(wall)
            m["decode_tok_s_cpu"].append(cpu)
    medians = {name: {k: statistics.median(v) for k, v in m.items()} for name, m in measures.items()}
    params = {name: count_parameters(model) for name, model in models.items()}
    result = {"pruned": how, "rounds": args.rounds, "threads": args.threads, "params": params, "medians": medians,
              "raw": measures, "load_average": os.getloadavg()[0]}
    lines = [f"`{COMMAND}`", "",
             f"SmolLM2-135M-Instruct, dense vs pruned ({how}); CPU, {args.threads} threads, {args.rounds} interleaved "
             "rounds, medians. Forward: 128 tokens, no KV cache, logits included. Decode: greedy, "
             f"{args.new_tokens} new tokens after a 16-token prompt, batch 1, KV cache. The machine was shared "
             f"(1-minute load average {os.getloadavg()[0]:.1f} at the end on 2 cores): the CPU columns (user + "
             "system seconds of all threads per call, or tokens per CPU second) are steadier than wall-clock.", "",
             "| measure | dense | pruned | dense / pruned |", "|---|---|---|---|",
             f"| parameters | {params['dense']:,} | {params['pruned']:,} | {params['dense'] / params['pruned']:.2f} |"]
    for suffix, what in (("", "wall"), ("_cpu", "CPU")):
        for key, label in (("forward_b1_ms", "forward batch 1 (ms)"), ("forward_b8_ms", "forward batch 8 (ms)")):
            d, p = medians["dense"][key + suffix], medians["pruned"][key + suffix]
            lines.append(f"| {label}, {what} | {d:.1f} | {p:.1f} | {d / p:.2f} |")
        d, p = medians["dense"]["decode_tok_s" + suffix], medians["pruned"]["decode_tok_s" + suffix]
        lines.append(f"| decode (tokens per {what} s) | {d:.1f} | {p:.1f} | {d / p:.2f} "
                     f"(pruned / dense: {p / d:.2f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
