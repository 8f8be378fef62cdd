"""Hugging Face transformers: prune FFN neurons and attention heads, save and reload.

    >>> from subprune.hf import TransformerPruneConfig, prune_transformer, save_pruned, load_pruned
    >>> result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", heads=0.5, ffn=0.5))
    >>> save_pruned(result.model, "pruned/", tokenizer); model = load_pruned("pruned/")

Needs the ``transformers`` package (installed by the Makefile); importing this
package does not import transformers itself.
"""

from subprune.hf.architectures import TransformerSite, find_transformer_sites, widths
from subprune.hf.budget import keep_ratio_for_parameters
from subprune.hf.prune import TRANSFORMER_METHODS, TransformerPruneConfig, TransformerPruneResult, prune_transformer
from subprune.hf.serialization import load_pruned, save_pruned

__all__ = [
    "TRANSFORMER_METHODS",
    "TransformerPruneConfig",
    "TransformerPruneResult",
    "TransformerSite",
    "find_transformer_sites",
    "keep_ratio_for_parameters",
    "load_pruned",
    "prune_transformer",
    "save_pruned",
    "widths",
]
