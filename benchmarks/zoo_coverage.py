"""Coverage of timm architectures: how much of each model subprune can prune, next to Torch-Pruning.

Every architecture is built by timm with random weights (``pretrained=False``,
10 classes) at a small input size. Per architecture:

* the share of its Linear/Conv layers that lie in a pruning site (as producer,
  or as a grouped/depthwise convolution carried by one), with coupled residual
  sites on;
* keep 1.0: the model cut with every index kept reproduces the dense output
  (max abs difference), which runs every slicing path with identity indices;
* keep 0.5 in every site (LayerWeightNorm ranking, no refit: cheap and enough
  to exercise the surgery): the params ratio dense / pruned, whether the pruned
  model runs, and whether it equals the dense model with the removed channels'
  consumer columns zeroed (for sites without a renormalised LayerNorm), and
  how far that masked model is from the dense one (so the check is not vacuous:
  norm scales and layer scales are randomised first, see :func:`excite`);
* Torch-Pruning 1.6.1 at the same setting (``MetaPruner``, L1 magnitude,
  ``pruning_ratio=0.5``, the classifier ignored, as its README shows): its
  params ratio and whether its pruned model runs.

Run (about 10 minutes on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_coverage.py --out results/zoo_coverage

Needs timm and torch-pruning (``make zoo-extras``); torchvision is not needed
(:func:`subprune.models.timm_import.import_timm`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from subprune.baselines import ScoreContext, default_loss, weight_norm_scores
from subprune.convs import freeze_conv_weights
from subprune.graph import LAYERS
from subprune.models.timm_import import import_timm
from subprune.sites import find_sites
from subprune.surgery import consumer_weight_matrix, prune_model

# (family, timm name, input size); transformers take img_size=size.
ARCHITECTURES = [
    ("ResNet", "resnet18", 64), ("ResNet", "resnet50", 64), ("ResNet", "seresnet18", 64),
    ("ResNet", "resnet26d", 64), ("ResNeXt", "resnext26ts", 64), ("RegNet", "regnetx_002", 64),
    ("RegNet", "regnety_002", 64), ("Res2Net", "res2net50_14w_8s", 64),
    ("MobileNet", "mobilenetv2_050", 64), ("MobileNet", "mobilenetv3_small_050", 64),
    ("MobileNet", "mobilenetv3_large_100", 64), ("MobileNet", "lcnet_050", 64),
    ("EfficientNet", "efficientnet_b0", 64), ("EfficientNet", "efficientnet_lite0", 64),
    ("EfficientNet", "tf_efficientnet_b0", 64), ("MnasNet", "mnasnet_050", 64), ("MnasNet", "semnasnet_050", 64),
    ("GhostNet", "ghostnet_050", 64), ("RexNet", "rexnet_100", 64), ("FBNet", "fbnetc_100", 64),
    ("MixNet", "mixnet_s", 64), ("TinyNet", "tinynet_e", 64),
    ("DenseNet", "densenet121", 64), ("DLA", "dla34", 64), ("DPN", "dpn68", 64), ("HRNet", "hrnet_w18_small", 64),
    ("VoVNet", "ese_vovnet19b_dw", 64), ("SelecSLS", "selecsls42b", 64),
    ("ConvNeXt", "convnext_atto", 64), ("ConvNeXt", "convnextv2_atto", 64),
    ("ViT", "vit_tiny_patch16_224", 64), ("DeiT", "deit_tiny_patch16_224", 64),
    ("Swin", "swin_tiny_patch4_window7_224", 128), ("Mixer", "mixer_s16_224", 64), ("ResMLP", "resmlp_12_224", 64),
    ("PoolFormer", "poolformer_s12", 64), ("LeViT", "levit_128s", 64),
    ("CSP", "cspresnet50", 64), ("CSP", "cspdarknet53", 64), ("CSP", "cs3darknet_s", 64),
    ("RepVGG", "repvgg_a0", 64), ("Inception", "inception_v3", 96), ("Xception", "xception41", 64),
    ("VGG", "vgg11_bn", 64), ("NFNet", "nf_resnet26", 64), ("NFNet", "nf_resnet26:frozen", 64),
    ("GENet", "gernet_s", 64),
]
TRANSFORMERS = ("vit", "deit", "swin", "mixer", "resmlp", "levit")


EXTRA = {"swin_tiny_patch4_window7_224": {"window_size": 4}}  # 128 px: 32 -> 16 -> 8 -> 4 tokens, windows of 4


def excite(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every normalisation and layer-scale parameter a random, non-zero value, in place.

    timm initialises the last norm of many residual branches to zero (``zero_init_last``) and layer
    scales to 1e-6: with those weights a branch outputs (almost) nothing, so a random-weight model
    would reproduce its dense output, and the pruned model equal the masked one, whatever was cut
    inside the branch (and timm's Mixer/ResMLP zero their classifier). Norm scales, layer scales and
    other vectors of |values| <= 1e-3 ~ U(0.5, 1.5); norm shifts and running means ~ N(0, 0.1^2);
    running variances ~ U(0.5, 1.5); matrices of |values| <= 1e-3 ~ N(0, 1 / fan_in).
    """
    def uniform(t: torch.Tensor) -> None:
        t.copy_(0.5 + torch.rand(t.shape, generator=generator))

    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
            for name, param in module.named_parameters(recurse=False):
                tiny = name != "bias" and bool((param.abs() <= 1e-3).all())  # zero-init heads, 1e-6 layer scales
                if is_norm and name == "weight" or name in ("gamma", "scale") or "layer_scale" in name or (
                        tiny and param.dim() <= 1):
                    uniform(param)
                elif is_norm and name == "bias":
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                elif tiny:  # e.g. a classifier initialised to zero (Mixer, ResMLP): unit-variance outputs
                    param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_var is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                uniform(module.running_var)
    return model


def build(timm, name: str, size: int) -> nn.Module:
    """The timm model, its norms excited (:func:`excite`); ``NAME:frozen``: weight-standardised convs frozen."""
    name, _, variant = name.partition(":")
    kwargs = {"img_size": size, **EXTRA.get(name, {})} if name.startswith(TRANSFORMERS) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    excite(model, torch.Generator().manual_seed(2))
    if variant == "frozen":
        model, _ = freeze_conv_weights(model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def masked(model: nn.Module, sites, keep) -> nn.Module:
    """The dense model with the consumer columns of every removed unit set to zero."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for site in sites:
            dropped = sorted(set(range(site.channels)) - set(keep[site.name].tolist()))
            for ref in site.consumers:
                w = consumer_weight_matrix(dense.get_submodule(ref.module))  # (d, m), a view
                width = ref.span // site.channels
                for unit in dropped:
                    w[(ref.start + unit * width) * ref.kernel : (ref.start + (unit + 1) * width) * ref.kernel] = 0
    return dense


def subprune_row(model: nn.Module, x: torch.Tensor) -> dict:
    row: dict = {}
    t0 = time.perf_counter()
    sites, skipped = find_sites(model, x[:2], coupled=True)
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    covered = {p.module for s in sites for p in s.producers} | {g for s in sites for g in s.groupwise}
    row.update(layers=len(layers), in_sites=len(covered & set(layers)), sites=len(sites),
               share=len(covered & set(layers)) / max(1, len(layers)),
               skipped_reasons=sorted({s.reason for s in skipped}))
    with torch.no_grad():
        dense_out = model(x)
        full = prune_model(model, sites, {s.name: torch.arange(s.channels) for s in sites})
        row["keep1_max_diff"] = float((full(x) - dense_out).abs().max())
        context = ScoreContext(model, sites, x, None, default_loss, len(x), torch.Generator().manual_seed(0))
        scores = weight_norm_scores(context)
        keep = {s.name: torch.sort(torch.topk(scores[s.name], max(1, round(s.channels / 2))).indices).values
                for s in sites}
        try:
            half = prune_model(model, sites, keep)
            out = half(x)
            row.update(runs=bool(out.shape == dense_out.shape and torch.isfinite(out).all()),
                       params_ratio=n_params(model) / n_params(half))
        except Exception as exc:  # reported in the table, never hidden
            row.update(runs=False, params_ratio=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        plain = [s for s in sites if not s.renormalised]
        if plain:
            cut = prune_model(model, plain, keep)
            masked_out = masked(model, plain, keep)(x)
            row["cut_vs_masked"] = float((cut(x) - masked_out).abs().max())
            # what masking changed: near 0 would make the comparison above vacuous (no signal through the sites)
            row["masked_vs_dense"] = float((masked_out - dense_out).abs().max())
    row["subprune_seconds"] = time.perf_counter() - t0
    return row


TP_SECONDS = 300  # Torch-Pruning's dependency graph search can run away (rexnet): give up after this


class _Timeout(Exception):
    pass


def _timeout(signum, frame):
    raise _Timeout(f"no result after {TP_SECONDS} s")


def torch_pruning_row(model: nn.Module, x: torch.Tensor) -> dict:
    try:
        import torch_pruning as tp
    except ImportError:
        return {"tp_status": "not installed"}
    model = copy.deepcopy(model)
    dense = n_params(model)
    t0 = time.perf_counter()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(TP_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
            ignored = [m for m in (classifier if isinstance(classifier, (list, tuple)) else [classifier])
                       if isinstance(m, nn.Module)]
            pruner = tp.pruner.MetaPruner(model, x[:2], importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=0.5, ignored_layers=ignored)
            pruner.step()
    except Exception as exc:
        return {"tp_status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}",
                "tp_seconds": time.perf_counter() - t0}
    finally:
        signal.alarm(0)
    row = {"tp_params_ratio": dense / n_params(model), "tp_seconds": time.perf_counter() - t0}
    try:
        with torch.no_grad():
            out = model(x)
        row["tp_status"] = "runs" if torch.isfinite(out).all() and out.shape[-1] == 10 else "wrong output"
    except Exception as exc:
        row["tp_status"] = f"pruned model fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| family | architecture | layers | in sites | share | sites | keep 1.0 max diff | cut = masked | "
        "masked - dense | subprune params ratio @0.5 | runs | TP params ratio @0.5 | TP pruned model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fatal" in r:
            lines.append(f"| {r['family']} | {r['arch']} | | | | | | | | {r['fatal']} | | | |")
            continue
        ratio = f"{r['params_ratio']:.2f}" if r.get("params_ratio") else "-"
        tp_ratio = f"{r['tp_params_ratio']:.2f}" if r.get("tp_params_ratio") else "-"
        masked_diff = f"{r['cut_vs_masked']:.1e}" if "cut_vs_masked" in r else "n/a"
        signal = f"{r['masked_vs_dense']:.1e}" if "masked_vs_dense" in r else "n/a"
        lines.append(
            f"| {r['family']} | {r['arch']} | {r['layers']} | {r['in_sites']} | {100 * r['share']:.0f}% | "
            f"{r['sites']} | {r['keep1_max_diff']:.1e} | {masked_diff} | {signal} | {ratio} | "
            f"{'yes' if r['runs'] else 'NO'} | {tp_ratio} | {r.get('tp_status', '-')} |"
        )
    return "\n".join(lines)


LAST_LAYER = "outputs are the model's outputs"


def pattern(reason: str) -> str:
    """A skip reason without the names and sizes of the node or layer it was met at (``'cat_12'`` -> ``'cat'``)."""
    reason = re.sub(r"'([A-Za-z_]+?)_\d+'", r"'\1'", reason)  # fx node names: getitem_10, layer_norm_3, ...
    reason = re.sub(r"^(\w+) '[^']+' is a", r"\1 '...' is a", reason)  # ScaledStdConv2d 'stages.0.0.conv1' is a
    return re.sub(r"with \d+ groups do not divide its \d+ channels", "with G groups do not divide its C channels",
                  reason)


def patterns_section(rows: list[dict]) -> str:
    """Every skip pattern still reported (but the classifier's), where, and the architectures at most half in sites.

    From the rows' ``skipped_reasons`` (the distinct reasons of each architecture's skipped layers): a
    pattern's count is the number of distinct graph nodes or layers it names in that architecture (none for a
    reason that names none: ``--explain`` counts the layers).
    """
    ok = [r for r in rows if "fatal" not in r]
    where: dict[str, dict[str, int]] = {}  # pattern -> architecture -> distinct nodes/layers named (0: none named)
    for r in ok:
        for reason in r.get("skipped_reasons", []):
            if LAST_LAYER not in reason:
                archs = where.setdefault(pattern(reason), {})  # a reason naming a node or layer quotes it
                archs[r["arch"]] = archs.get(r["arch"], 0) + ("'" in pattern(reason))
    low = [r for r in ok if r["share"] <= 0.5]
    lines = ["## Architectures with at most half of their Linear/Conv layers in sites", "",
             "| architecture | in sites | what stops the rest (the reasons subprune reports) |", "|---|---|---|"]
    for r in low:
        stops = sorted({pattern(x) for x in r.get("skipped_reasons", []) if LAST_LAYER not in x})
        lines.append(f"| {r['arch']} | {r['in_sites']} of {r['layers']} ({100 * r['share']:.0f}%) | "
                     + "<br>".join(stops) + " |")
    lines += ["", "## Every pattern still reported unprunable", "",
              "Each reason a Linear/Conv layer is in no site (the classifier's, \"its outputs are the model's "
              "outputs\", left out), with the architectures where it is met (in brackets: at how many distinct nodes "
              "or layers). Why each is a limit, and what would lift it: docs/zoo.md, \"What is not covered\".", "",
              "| reason | architectures |", "|---|---|"]
    for reason, archs in sorted(where.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {reason} | " + ", ".join(f"{a} ({n})" if n else a for a, n in archs.items()) + " |")
    return "\n".join(lines) + "\n"


def explain(timm, names: list[str], samples: int) -> None:
    """Per architecture: how many layers each skip pattern stops, and a few of their names."""
    for name in names:
        size = next((a[2] for a in ARCHITECTURES if a[1] == name), 64)
        model = build(timm, name, size)
        x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(0))
        sites, skipped = find_sites(model, x[:2], coupled=True)
        layers = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
        covered = {p.module for s in sites for p in s.producers} | {g for s in sites for g in s.groupwise}
        print(f"{name}: {len(covered & set(layers))} of {len(layers)} Linear/Conv layers in sites, "
              f"{len(skipped)} skipped entries (a layer or a part of one)")
        by: dict[str, list[str]] = {}
        for entry in skipped:
            by.setdefault(pattern(entry.reason), []).append(entry.name)
        for reason, entries in sorted(by.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(entries):4d}  {reason}\n        e.g. {', '.join(entries[:3])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", help="comma-separated timm names (default: the list above)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--out", help="write OUT.jsonl and OUT.md")
    parser.add_argument("--explain", help="comma-separated timm names: print how many layers each skip reason stops")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    timm = import_timm()
    if args.explain:
        explain(timm, args.explain.split(","), args.samples)
        return
    chosen = ARCHITECTURES if not args.archs else [
        next((a for a in ARCHITECTURES if a[1] == name), ("-", name, 64)) for name in args.archs.split(",")]
    rows, done = [], {}
    if args.out and Path(args.out).with_suffix(".jsonl").exists():  # resume: finished architectures are kept
        done = {r["arch"]: r for r in map(json.loads, Path(args.out).with_suffix(".jsonl").read_text().splitlines())}
    for family, name, size in chosen:
        if name in done:
            rows.append(done[name])
            continue
        torch.manual_seed(0)
        row = {"family": family, "arch": name, "input": size}
        try:
            model = build(timm, name, size)
            x = torch.randn(args.samples, 3, size, size, generator=torch.Generator().manual_seed(0))
            row.update(subprune_row(model, x))
            if not args.no_tp:
                row.update(torch_pruning_row(model, x))
        except Exception as exc:
            row["fatal"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "skipped_reasons"}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(Path(args.out).with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    text = table(rows)
    ok = [r for r in rows if "fatal" not in r]
    most = sum(r["share"] > 0.5 for r in ok)
    none = sum(r["in_sites"] == 0 for r in ok)
    summary = (f"\n\n{most} of {len(rows)} architectures have most of their Linear/Conv layers in sites; "
               f"{none} {'has' if none == 1 else 'have'} none; "
               f"subprune's pruned model runs for {sum(bool(r['runs']) for r in ok)}, "
               f"Torch-Pruning's for {sum(r.get('tp_status') == 'runs' for r in ok)}.\n")
    print(text + summary)
    if args.out:
        out = Path(args.out)
        command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_coverage.py " + " ".join(sys.argv[1:])
        out.with_suffix(".md").write_text(
            f"# timm zoo coverage: subprune vs Torch-Pruning 1.6.1\n\n`{command}`\n\n"
            f"timm {timm.__version__}, random weights, {args.samples} random inputs per model, coupled sites on, "
            "keep 0.5 in every site.\n\n" + text + summary + "\n" + patterns_section(rows))


if __name__ == "__main__":
    main()
