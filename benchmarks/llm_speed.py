"""Speed of pruned SmolLM2-135M models against the dense one: forward latency and decode tokens/s, interleaved rounds.

The pruned models are directories written by ``subprune prune --model hf:smollm2-135m --out DIR``
(``--pruned DIR ...``), or, by default, pruned here with Wanda at each of ``--params`` (fractions of the
prunable parameters kept; default 0.8 and 0.5, i.e. 20% and 50% removed) from ``--calib`` Wikipedia
passages (no greedy solver, so it takes a minute each; the speed depends only on the widths, not on the
method). Each round measures, for the dense model and every pruned one (the order rotates between rounds):

* latency of one forward of 128 tokens at batch 1 and batch 8 (no KV cache, logits included);
* greedy decoding of 64 new tokens after a 16-token prompt at batch 1 (KV cache on): tokens per second.

Medians over the rounds; the speed-up dense time / pruned time (> 1: the pruned model is faster). CPU, fixed
thread count (one thread by default: on a shared machine, more threads than free cores make OpenMP spin and
inflate both wall-clock and CPU time).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_speed.py --rounds 5 --json results/llm_speed.json \
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

COMMAND = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_speed.py --rounds 5 --json results/llm_speed.json "
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


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", nargs="+", default=None,
                        help="directories written by subprune prune (default: prune here at each of --params)")
    parser.add_argument("--params", nargs="+", type=float, default=[0.8, 0.5],
                        help="fractions of the prunable parameters kept, one pruned model each (default 0.8 0.5)")
    parser.add_argument("--calib", type=int, default=16, help="calibration passages of the Wanda prunes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_smollm2()
    passages = wikipedia_passages()
    models, how = {"dense": dense}, {}
    if args.pruned:
        import transformers

        for directory in args.pruned:
            name = f"pruned {Path(directory).name}"
            models[name] = load_pruned(directory, transformers.AutoModelForCausalLM).eval()
            how[name] = f"loaded from {directory}"
    else:
        calibration = tokenize(tokenizer, passages[: args.calib])
        for params in args.params:
            name = f"pruned {1 - params:.0%}"
            config = TransformerPruneConfig(method="wanda", heads=0.5, ffn=0.5, params=params)
            models[name] = prune_transformer(dense, calibration, config).model.eval()
            how[name] = f"Wanda, {1 - params:.0%} of the prunable parameters removed, {args.calib} calibration passages"
    ids = tokenize(tokenizer, passages[-8:], max_length=128)["input_ids"]
    if ids.shape[1] < 128:
        raise ValueError("the held-out passages are shorter than 128 tokens")
    batch1, batch8, prompt = ids[:1, :128], ids[:8, :128], ids[:1, :16]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for model in models.values():  # warm-up
        forward_seconds(model, batch1)
        decode_tokens_per_second(model, prompt, 4, pad)
    load_start = _load_average()
    keys = ("forward_b1_ms", "forward_b8_ms", "decode_tok_s")
    measures = {name: {k + suffix: [] for k in keys for suffix in ("", "_cpu")} for name in models}
    names = list(models)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # every model first in turn
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
    load_end = _load_average()
    result = {"pruned": how, "rounds": args.rounds, "threads": args.threads, "params": params, "medians": medians,
              "raw": measures, "load_average_start": load_start, "load_average_end": load_end}
    pruned_names = names[1:]
    lines = [f"`{COMMAND}`", "",
             f"SmolLM2-135M-Instruct, dense vs pruned ({'; '.join(f'{n}: {h}' for n, h in how.items())}); CPU, "
             f"{args.threads} thread(s), {args.rounds} interleaved rounds (the order rotates), medians. Forward: "
             "128 tokens, no KV cache, logits included. Decode: greedy, "
             f"{args.new_tokens} new tokens after a 16-token prompt, batch 1, KV cache. The machine (2 cores) was "
             f"shared: load average (1 / 5 / 15 min) {load_start} when the rounds started and {load_end} at the end; "
             "the CPU columns (user + system seconds per call, or tokens per CPU second) are steadier than "
             "wall-clock.", "",
             "| measure | dense | " + " | ".join(f"{n} | speed-up" for n in pruned_names) + " |",
             "|---|---|" + "---|---|" * len(pruned_names),
             "| parameters | " + f"{params['dense']:,} | "
             + " | ".join(f"{params[n]:,} | {params['dense'] / params[n]:.2f}" for n in pruned_names) + " |"]
    for suffix, what in (("", "wall"), ("_cpu", "CPU")):
        for key, label in (("forward_b1_ms", "forward batch 1 (ms)"), ("forward_b8_ms", "forward batch 8 (ms)"),
                           ("decode_tok_s", f"decode (tokens per {what} s)")):
            d = medians["dense"][key + suffix]
            speedup = {n: (medians[n][key + suffix] / d if key == "decode_tok_s" else d / medians[n][key + suffix])
                       for n in pruned_names}
            cells = " | ".join(f"{medians[n][key + suffix]:.1f} | {speedup[n]:.2f}" for n in pruned_names)
            lines.append(f"| {label}{'' if key == 'decode_tok_s' else ', ' + what} | {d:.1f} | {cells} |")
    lines += ["", "speed-up: dense time / pruned time for the forwards, pruned tokens/s / dense tokens/s for decode "
              "(> 1: the pruned model is faster); parameters: dense / pruned."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
