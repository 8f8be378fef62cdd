"""subprune: data-efficient structured pruning via submodular optimization.

Remove whole neurons and channels of a trained PyTorch model with a few hundred
unlabeled samples, refit the next layer by least squares, and get back a
physically smaller model (El Halabi, Srinivas & Lacoste-Julien, NeurIPS 2022).

    >>> from subprune import PruneConfig, prune
    >>> result = prune(model, calibration, PruneConfig(method="asym", keep=0.25))
    >>> result.model  # a smaller copy; ``model`` is unchanged
"""

from subprune.pipeline import PruneConfig, PruneResult, SiteReport, prune
from subprune.serialization import load_pruned, save_pruned
from subprune.sites import PruningSite, SkippedLayer, find_sites
from subprune.solver import GreedyResult, greedy_select, refit

__all__ = [
    "GreedyResult",
    "PruneConfig",
    "PruneResult",
    "PruningSite",
    "SiteReport",
    "SkippedLayer",
    "find_sites",
    "greedy_select",
    "load_pruned",
    "prune",
    "refit",
    "save_pruned",
]
__version__ = "0.1.0"
