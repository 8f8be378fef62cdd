"""Adapters for Hugging Face transformers: where the FFN neurons and attention heads are.

Every architecture fact (number of heads, head_dim, key/value groups, FFN width)
is read from the model's config and module shapes; the algorithm holds none.
Two kinds of pruning site per transformer block:

* ``ffn``: producer = the up projection(s) (``intermediate.dense``; ``c_fc``;
  ``fc1``; ``gate_proj`` and ``up_proj`` of a gated MLP), one output feature per
  unit; consumer = the down projection; group size 1.
* ``heads``: producer = the query/key/value slices of one unit; consumer = the
  attention output projection. A unit is one key/value head with the
  ``n_heads / n_kv_heads`` query heads that share it (plain multi-head attention:
  one head), so the group is ``n_heads / n_kv_heads * head_dim`` contiguous
  columns of the output projection (transformers' ``repeat_kv`` maps query head
  h to key/value head h // n_rep).
* ``heads`` with ``units="qheads"`` (grouped-query attention only): a unit is
  one query head (producer: its q_proj rows; group: its head_dim columns of the
  output projection); the shared keys and values stay, and every key/value
  group keeps the same number of query heads (``TransformerSite.kv_groups``),
  so the pruned attention is again grouped-query attention with fewer query
  heads per group (SmolLM2: 9 units a layer instead of 3).

Supported ``config.model_type``: bert, roberta, gpt2, opt, llama, mistral,
qwen2, qwen3. Source: docs/how-it-works.md, "Terms" (groups); El Halabi et al., NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subprune.solver import group_columns
from subprune.surgery import get_module, set_module

HEADS, FFN = "heads", "ffn"
UNITS = ("kv", "qheads")  # attention units: key/value groups (with their query heads), or query heads


@dataclass(frozen=True)
class BlockSpec:
    """Module names inside one transformer block, and how to tell attention its new head count.

    Attributes
    ----------
    layers : str
        Suffix of the name of the ``nn.ModuleList`` of blocks.
    qkv : tuple of str
        The query, key and value projections, or one fused projection (GPT-2's
        ``c_attn``, output [q | k | v]).
    out : str
        Attention output projection (the heads' consumer).
    attention : str
        The attention module whose head-count attributes are updated.
    up : tuple of str
        FFN producers (two for a gated MLP).
    down : str
        FFN consumer.
    set_heads : callable(attention module, n query heads, head_dim)
        Writes the new head count to the attributes its forward reads.
    """

    layers: str
    qkv: tuple[str, ...]
    out: str
    attention: str
    up: tuple[str, ...]
    down: str
    set_heads: Callable[[nn.Module, int, int], None]


def _set_bert(attn: nn.Module, n: int, head_dim: int) -> None:
    attn.num_attention_heads, attn.all_head_size = n, n * head_dim


def _set_gpt2(attn: nn.Module, n: int, head_dim: int) -> None:
    attn.num_heads, attn.split_size = n, n * head_dim


def _set_opt(attn: nn.Module, n: int, head_dim: int) -> None:
    attn.num_heads = n


def _set_nothing(attn: nn.Module, n: int, head_dim: int) -> None:
    """LLaMA-style attention reshapes with -1 heads and keeps num_key_value_groups."""


_BERT = BlockSpec("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value"),
                  "attention.output.dense", "attention.self", ("intermediate.dense",), "output.dense", _set_bert)
_LLAMA = BlockSpec("layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                   "self_attn", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", _set_nothing)
SPECS: dict[str, BlockSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": BlockSpec("h", ("attn.c_attn",), "attn.c_proj", "attn", ("mlp.c_fc",), "mlp.c_proj", _set_gpt2),
    "opt": BlockSpec("decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "self_attn.out_proj", "self_attn", ("fc1",), "fc2", _set_opt),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


@dataclass(frozen=True)
class Slice:
    """Output features of a producer that belong to the units: ``offset + unit * width + [0, width)``."""

    module: str
    offset: int
    width: int


@dataclass(frozen=True)
class TransformerSite:
    """One FFN or attention pruning site of a transformer block.

    Attributes
    ----------
    name : str
        ``"<block>.heads"`` or ``"<block>.ffn"``, e.g. ``"encoder.layer.0.ffn"``.
    kind : str
        ``"heads"`` or ``"ffn"``.
    layer : int
    consumer : str
        Full module name of the consumer (Linear or GPT-2 Conv1D).
    producers : tuple of Slice
    channels : int
        Units n: FFN neurons, or key/value groups.
    group_size : int
        Consumer input columns per unit (1, or heads per group * head_dim).
    attention : str or None
        Full name of the attention module (heads sites only).
    head_dim : int
    kv_groups : int
        0, or (query-head units) the number of key/value groups: every group
        keeps the same number of its ``channels / kv_groups`` query heads, so a
        site keeps a multiple of ``kv_groups`` units; units of group j are
        ``j * channels / kv_groups ...``.
    """

    name: str
    kind: str
    layer: int
    consumer: str
    producers: tuple[Slice, ...]
    channels: int
    group_size: int
    attention: str | None = None
    head_dim: int = 0
    kv_groups: int = 0


def model_type(model: nn.Module) -> str:
    """``model.config.model_type``; TypeError when the model is not a supported transformers model."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SPECS:
        raise TypeError(
            f"not a supported Hugging Face transformers model (config.model_type={kind!r}); supported: "
            f"{', '.join(sorted(SPECS))}. For other models use subprune.prune (torch.fx sites)."
        )
    return kind


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a Linear whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def consumer_weight(module: nn.Module) -> Tensor:
    """W of shape (d_in, d_out) for a Linear (weight.T) or Conv1D (weight), detached."""
    w = module.weight.detach()
    return w if is_conv1d(module) else w.T


def head_geometry(config) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of the dense model, from its config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Full name and module of the list of transformer blocks."""
    spec = SPECS[model_type(model)]
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == spec.layers or name.endswith("." + spec.layers)):
            return name, module
    raise TypeError(f"no module list named '*{spec.layers}' in this {model_type(model)} model")


def ffn_output_norm(model: nn.Module) -> str | None:
    """Block-relative name of the norm applied to ``residual + down_projection(...)``; None when the sum is the output.

    Every supported block ends in that sum, pre-norm (LLaMA style, GPT-2,
    pre-norm OPT: the sum is the block output) or post-norm (BERT/RoBERTa's
    ``output.LayerNorm``, post-norm OPT's ``final_layer_norm``). So when the FFN
    consumer is replaced, the block's new output is the old sum plus (new
    consumer output - old consumer output), normalised when post-norm: the block
    engine (:mod:`subprune.hf.engine`) gets it without running the block again.
    """
    kind = model_type(model)
    if kind in ("bert", "roberta"):
        return "output.LayerNorm"
    if kind == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return "final_layer_norm"
    return None


def find_transformer_sites(model: nn.Module, units: str = "kv") -> list[TransformerSite]:
    """The heads and FFN sites of every block, in forward order (heads before FFN in each block).

    Current widths are read from module shapes, so an already pruned model
    (non-uniform heads and FFN widths, fewer query heads per key/value group) is
    described correctly.

    Parameters
    ----------
    model : transformers model
    units : {"kv", "qheads"}
        Attention units: key/value groups with their query heads, or query
        heads inside the groups (grouped-query attention with separate q/k/v
        projections; otherwise the same as "kv").

    Raises
    ------
    TypeError
        If the model is not a supported transformers model.
    ValueError
        On an unknown ``units``.
    """
    if units not in UNITS:
        raise ValueError(f"units={units!r} is unknown; choose one of {', '.join(UNITS)}")
    spec = SPECS[model_type(model)]
    _, _, head_dim = head_geometry(model.config)
    prefix, layers = blocks(model)
    sites = []
    for i, block in enumerate(layers):
        base = f"{prefix}.{i}"
        out = get_module(block, spec.out)
        if len(spec.qkv) == 1:  # fused [q | k | v], all of width n_heads * head_dim
            n_groups, rep = in_features(out) // head_dim, 1
            width = n_groups * head_dim
            name = f"{base}.{spec.qkv[0]}"
            producers = tuple(Slice(name, j * width, head_dim) for j in range(3))
        else:
            q, k, v = (f"{base}.{m}" for m in spec.qkv)
            n_groups = out_features(get_module(model, k)) // head_dim  # key/value groups left
            rep = out_features(get_module(model, q)) // (n_groups * head_dim)  # query heads per group
            producers = (Slice(q, 0, rep * head_dim), Slice(k, 0, head_dim), Slice(v, 0, head_dim))
        if units == "qheads" and len(spec.qkv) == 3 and rep > 1:
            sites.append(TransformerSite(f"{base}.heads", HEADS, i, f"{base}.{spec.out}",
                                         (Slice(f"{base}.{spec.qkv[0]}", 0, head_dim),), n_groups * rep, head_dim,
                                         f"{base}.{spec.attention}", head_dim, kv_groups=n_groups))
        else:
            sites.append(TransformerSite(f"{base}.heads", HEADS, i, f"{base}.{spec.out}", producers, n_groups,
                                         rep * head_dim, f"{base}.{spec.attention}", head_dim))
        down = get_module(block, spec.down)
        sites.append(TransformerSite(f"{base}.ffn", FFN, i, f"{base}.{spec.down}",
                                     tuple(Slice(f"{base}.{m}", 0, 1) for m in spec.up), in_features(down), 1))
    return sites


def check_group_quota(site: TransformerSite, keep: Tensor) -> None:
    """ValueError unless ``keep`` holds the same number of query heads of every key/value group (``kv_groups`` > 0)."""
    if not site.kv_groups:
        return
    per_group = site.channels // site.kv_groups
    counts = torch.bincount(keep // per_group, minlength=site.kv_groups)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"{site.name}: every key/value group must keep the same number of query heads, "
                         f"got {counts.tolist()} (keep a multiple of {site.kv_groups} heads, chosen per group)")


def _new_linear_like(module: nn.Module, n_in: int, n_out: int, bias: bool | None = None) -> nn.Module:
    """A Linear (or Conv1D) of shape n_in -> n_out like ``module``; ``bias`` None: a bias iff ``module`` has one."""
    factory = {"dtype": module.weight.dtype, "device": module.weight.device}
    if is_conv1d(module):
        new = type(module)(n_out, n_in)  # Conv1D(nf, nx)
        return new.to(**factory)
    return nn.Linear(n_in, n_out, bias=module.bias is not None if bias is None else bias, **factory)


@torch.no_grad()
def _slice_outputs(module: nn.Module, rows: Tensor) -> nn.Module:
    """A copy of a producer keeping the output features ``rows``."""
    new = _new_linear_like(module, in_features(module), rows.numel())
    if is_conv1d(module):
        new.weight.copy_(module.weight[:, rows])
    else:
        new.weight.copy_(module.weight[rows])
    if module.bias is not None:
        new.bias.copy_(module.bias[rows])
    new.train(module.training)
    return new


@torch.no_grad()
def _replace_consumer(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A consumer with weight W' of shape (d_in', d_out) and the given bias.

    A consumer without a bias gains one when ``bias`` is given (FLAP's bias
    compensation on LLaMA, whose projections have none).
    """
    new = _new_linear_like(module, weight.shape[0], weight.shape[1], bias=module.bias is not None or bias is not None)
    new.weight.copy_(weight if is_conv1d(module) else weight.T)
    if new.bias is not None:
        new.bias.copy_(module.bias if bias is None else bias)
    new.train(module.training)
    return new


def prune_transformer_site_(
    model: nn.Module,
    site: TransformerSite,
    keep: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """Cut one site of ``model`` in place: producers' output rows, consumer's input columns.

    Parameters
    ----------
    model : nn.Module
        Edited in place (callers pass a copy).
    site : TransformerSite
    keep : Tensor of shape (k,), int64
        Sorted kept units (neurons or key/value groups), 1 <= k <= site.channels.
    weight : Tensor of shape (k * site.group_size, d_out), optional
        Refit consumer weight W'; ``None`` keeps the old weights of the kept columns.
    bias : Tensor of shape (d_out,), optional
        New consumer bias (bias compensation); ``None`` keeps the old one. A
        consumer without a bias gains one.

    Raises
    ------
    ValueError
        On an invalid ``keep`` or a weight of the wrong shape.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    distinct = keep.unique().numel() == keep.numel()
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= site.channels or not distinct:
        raise ValueError(f"{site.name}: keep must hold 1..{site.channels} distinct units in 0..{site.channels - 1}")
    keep = torch.sort(keep).values
    check_group_quota(site, keep)
    by_module: dict[str, list[Tensor]] = {}
    for part in site.producers:
        by_module.setdefault(part.module, []).append(part.offset + group_columns(keep, part.width))
    for name, pieces in by_module.items():
        module = get_module(model, name)
        set_module(model, name, _slice_outputs(module, torch.cat(pieces).to(module.weight.device)))
    consumer = get_module(model, site.consumer)
    cols = group_columns(keep, site.group_size).to(consumer.weight.device)
    w = consumer_weight(consumer)[cols] if weight is None else weight
    if w.shape != (cols.numel(), out_features(consumer)):
        raise ValueError(f"{site.name}: consumer weight must have shape {(cols.numel(), out_features(consumer))}, "
                         f"got {tuple(w.shape)}")
    w = w.to(consumer.weight)
    set_module(model, site.consumer, _replace_consumer(consumer, w, None if bias is None else bias.to(w)))
    if site.kind == HEADS:
        n_heads = keep.numel() * site.group_size // site.head_dim
        attention = get_module(model, site.attention)
        SPECS[model_type(model)].set_heads(attention, n_heads, site.head_dim)
        if site.kv_groups:  # fewer query heads per key/value group: LLaMA-style attention repeats k/v this often
            attention.num_key_value_groups = keep.numel() // site.kv_groups


def widths(model: nn.Module) -> list[dict[str, int]]:
    """Per block: ``{"heads": query heads, "kv_heads": key/value heads, "ffn": FFN width}``."""
    out = []
    for site in find_transformer_sites(model):
        if site.kind == HEADS:
            out.append({"heads": site.channels * site.group_size // site.head_dim, "kv_heads": site.channels})
        else:
            out[-1]["ffn"] = site.channels
    return out
