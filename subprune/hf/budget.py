"""Budgets: the uniform keep ratio that meets a global parameter target.

Removing one unit of a site removes a known number of parameters: its producer
rows (weight and bias) and its consumer columns. :func:`parameters_per_unit`
reads them from module shapes; :func:`keep_ratio_for_parameters` bisects the
keep ratio, with the same rounding as the pruning plan, so the pruned model has
at most the target number of parameters.
"""

from __future__ import annotations

from torch import nn

from subprune.hf.architectures import FFN, HEADS, TransformerSite, find_transformer_sites, in_features, out_features
from subprune.surgery import get_module


def parameters_per_unit(model: nn.Module, site: TransformerSite) -> int:
    """Parameters removed with one unit of ``site``: producer rows (+ bias) and consumer columns."""
    total = 0
    for part in site.producers:
        module = get_module(model, part.module)
        total += part.width * (in_features(module) + (module.bias is not None))
    return total + site.group_size * out_features(get_module(model, site.consumer))


def kept_units(ratio: float, channels: int) -> int:
    """Units kept at a keep ratio: round(ratio * channels), at least 1 (as the pruning plan)."""
    return max(1, min(channels, round(ratio * channels)))


def keep_ratio_for_parameters(model: nn.Module, target: int, *, heads: bool = True, ffn: bool = True) -> float:
    """The largest uniform keep ratio whose pruned model has at most ``target`` parameters.

    Parameters
    ----------
    model : transformers model
    target : int
        Parameter count of the whole pruned model (embeddings included).
    heads, ffn : bool
        Which kinds of site the ratio applies to (the others are not pruned).

    Returns
    -------
    float
        Keep ratio in (0, 1], within 1e-6 of the threshold; use it as
        ``TransformerPruneConfig(heads=r or None, ffn=r or None)``.

    Raises
    ------
    ValueError
        If even one unit per site leaves more than ``target`` parameters.
    """
    kinds = {kind for kind, wanted in ((HEADS, heads), (FFN, ffn)) if wanted}
    sites = [s for s in find_transformer_sites(model) if s.kind in kinds]
    dense = sum(p.numel() for p in model.parameters())
    per_unit = [parameters_per_unit(model, s) for s in sites]

    def size(ratio: float) -> int:
        removed = (s.channels - kept_units(ratio, s.channels) for s in sites)
        return dense - sum(r * u for r, u in zip(removed, per_unit, strict=True))

    if size(1.0) <= target:
        return 1.0
    if size(0.0) > target:
        raise ValueError(f"target {target:,} parameters is below the smallest reachable size {size(0.0):,} "
                         f"(one unit per pruned site); prune more kinds of site or raise the target")
    low, high = 0.0, 1.0  # size(low) <= target < size(high)
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if size(mid) <= target else (low, mid)
    return low
