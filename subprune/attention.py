"""Attention heads of timm/torchvision-style vision transformers as pruning sites, recognised by behaviour.

A self-attention module that computes ``qkv = Linear(x)`` (3 x heads x head_dim
outputs, q then k then v), splits it into ``num_heads`` heads, attends, and
projects the concatenated heads with ``proj = Linear(heads x head_dim -> C)``
(timm's ``Attention``, the blocks of ViT/DeiT and their kin) has one pruning
site: its heads. Removing head h removes its q, k and v rows of ``qkv`` and its
head_dim input columns of ``proj``; the consumer refit is ``proj`` with groups
of head_dim columns (DESIGN.md Sec. 2, "head_dim for an attention head").

The module is recognised when it has Linear children ``qkv`` and ``proj`` and an
integer ``num_heads`` dividing them as above, and *confirmed by behaviour*: on
its own input from the example batch, the module with head 0 cut out (the rows
and columns sliced, ``num_heads`` and ``attn_dim`` decremented) must equal the
module with head 0's ``proj`` columns zeroed. A module that fails the check
(q/k/v of different widths as in LeViT, a gate) is reported with the reason;
nothing is assumed from class names. Parameters of the module with exactly one
axis of the heads' size (Swin's relative position bias table) are sliced with
the heads, and the behaviour check covers them.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

HEAD_ATTRIBUTES = ("num_heads", "attn_dim")


def _layout(module: nn.Module) -> tuple[int, int] | str:
    """(heads, head_dim) of an attention-like module, or why it is not one."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 1):
        return "not an attention module"
    width = proj.in_features
    if qkv.out_features != 3 * width or width % heads:
        return f"qkv has {qkv.out_features} outputs, not 3 x proj's {width} inputs split into {heads} heads"
    return heads, width // heads


def head_parameters(module: nn.Module, heads: int) -> list[tuple[str, int]]:
    """(name, axis) of the module's own per-head parameters (one axis of size ``heads``: Swin's bias table)."""
    found = []
    for name, param in module.named_parameters():
        if name.startswith(("qkv.", "proj.")):
            continue
        axes = [axis for axis, size in enumerate(param.shape) if size == heads]
        if len(axes) == 1:
            found.append((name, axes[0]))
    return found


def cut_heads_(module: nn.Module, kept: int) -> None:
    """Set the head attributes of an attention module whose layers now hold ``kept`` heads."""
    if isinstance(getattr(module, "attn_dim", None), int):
        module.attn_dim = kept * (module.attn_dim // module.num_heads)
    module.num_heads = kept


def confirm(module: nn.Module, x: Tensor) -> str | None:
    """None if cutting head 0 of ``module`` equals zeroing its proj columns on input ``x``; else the reason."""
    layout = _layout(module)
    if isinstance(layout, str):
        return layout
    heads, head_dim = layout
    width = heads * head_dim
    cols = torch.arange(head_dim, width)  # every head but head 0
    rows = torch.cat([cols + part * width for part in range(3)])  # its q, k and v rows
    masked, cut = copy.deepcopy(module).eval(), copy.deepcopy(module).eval()
    with torch.no_grad():
        masked.proj.weight[:, :head_dim] = 0
        qkv, proj = cut.qkv, cut.proj
        new_qkv = nn.Linear(qkv.in_features, rows.numel(), bias=qkv.bias is not None).to(qkv.weight)
        new_qkv.weight.copy_(qkv.weight[rows])
        if qkv.bias is not None:
            new_qkv.bias.copy_(qkv.bias[rows])
        new_proj = nn.Linear(cols.numel(), proj.out_features, bias=proj.bias is not None).to(proj.weight)
        new_proj.weight.copy_(proj.weight[:, cols])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
        cut.qkv, cut.proj = new_qkv, new_proj
        for name, axis in head_parameters(module, heads):  # per-head tables keep heads 1.. too
            owner_name, _, leaf = name.rpartition(".")
            owner = cut.get_submodule(owner_name) if owner_name else cut
            kept = getattr(owner, leaf).index_select(axis, torch.arange(1, heads))
            owner._parameters[leaf] = nn.Parameter(kept.clone())
        cut_heads_(cut, heads - 1)
        try:
            same = torch.allclose(cut(x), masked(x), atol=1e-5, rtol=1e-4)
        except Exception as exc:
            return f"its forward fails with a head removed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return None if same else "removing a head changes the other heads' outputs"


def attention_inputs(model: nn.Module, run) -> dict[str, Tensor]:
    """The first input of every module with ``qkv``/``proj``/``num_heads`` children, from one run of ``run(model)``."""
    candidates = {name: m for name, m in model.named_modules() if not isinstance(_layout(m), str)
                  or (hasattr(m, "qkv") and hasattr(m, "proj") and hasattr(m, "num_heads"))}
    inputs: dict[str, Tensor] = {}

    def keep(name: str, args: tuple) -> None:  # returns None: a pre-hook's return value would replace the input
        if args and isinstance(args[0], Tensor):
            inputs.setdefault(name, args[0][:2])

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(n, args)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return inputs
