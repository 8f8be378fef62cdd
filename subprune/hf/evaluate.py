"""Evaluation of pruned transformers: sentence-embedding fidelity, a linear probe, perplexity.

* :func:`sentence_embeddings`: mean pooling over real tokens, then L2
  normalisation (the pooling of all-MiniLM-L6-v2, see its ``1_Pooling`` config).
* :func:`embedding_cosine`: mean cosine of pruned to dense embeddings of the same text.
* :func:`linear_probe_accuracy`: k-fold cross-validated L2-regularised logistic
  regression on frozen embeddings (plain torch, L-BFGS).
* :func:`perplexity`: exp of the mean next-token cross-entropy over real tokens.
* :func:`greedy_generations`: greedy continuations of a few prompts (a readable check of a pruned LLM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokens: Mapping[str, Tensor], batch_size: int = 32) -> Tensor:
    """Mean-pooled, L2-normalised last hidden states, shape (N, hidden), float32.

    Parameters
    ----------
    model : transformers encoder (returns ``last_hidden_state``)
    tokens : dict with "input_ids" and "attention_mask", each (N, T)
    batch_size : int
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, tokens["input_ids"].shape[0], batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in tokens.items()}
        hidden = model(**batch).last_hidden_state  # (B, T, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, hidden)
        out.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(reference: Tensor, other: Tensor) -> float:
    """Mean cosine similarity of matching rows of two (N, hidden) embedding matrices."""
    if reference.shape != other.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    return float(F.cosine_similarity(reference.double(), other.double(), dim=-1).mean())


def linear_probe_accuracy(features: Tensor, labels: Tensor, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> float:
    """Cross-validated accuracy of logistic regression on frozen features.

    Parameters
    ----------
    features : Tensor of shape (N, h)
    labels : Tensor of shape (N,), int64 in 0..C-1
    folds : int
        k of k-fold cross-validation (a seeded random split).
    l2 : float
        Weight decay on the weights (not the bias), times the mean loss.
    seed : int

    Returns
    -------
    float
        Accuracy in [0, 1] over all held-out folds.
    """
    n = features.shape[0]
    if labels.shape != (n,) or folds < 2 or n < folds:
        raise ValueError(f"need labels of shape ({n},) and 2 <= folds <= {n}")
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    classes = int(labels.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for fold in perm.chunk(folds):
        train = torch.ones(n, dtype=torch.bool)
        train[fold] = False
        w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure(w=w, b=b, opt=opt, train=train):
            opt.zero_grad()
            loss = F.cross_entropy(x[train] @ w + b, labels[train]) + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            correct += int(((x[fold] @ w + b).argmax(1) == labels[fold]).sum())
    return correct / n


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Mapping[str, Tensor], batch_size: int = 16,
               progress: str | None = None) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over real tokens.

    Parameters
    ----------
    model : transformers causal LM (returns ``logits`` of shape (B, T, vocab))
    tokens : dict with "input_ids" (N, T) and optionally "attention_mask" (N, T)
    batch_size : int
        Sequences per forward pass.
    progress : str, optional
        Label of a progress bar over the batches (none if None).
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    ids_all = tokens["input_ids"]
    mask_all = tokens.get("attention_mask", torch.ones_like(ids_all))
    starts = range(0, ids_all.shape[0], batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        ids = ids_all[start : start + batch_size].to(device)
        mask = mask_all[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return math.exp(total / max(count, 1))


PROMPTS = (
    "The capital of France is",
    "The theory of evolution by natural selection",
    "In 1969, astronauts",
)


@torch.no_grad()
def greedy_generations(model: nn.Module, tokenizer, prompts: tuple[str, ...] = PROMPTS,
                       new_tokens: int = 24, progress: str | None = None) -> dict[str, str]:
    """Greedy continuation of each prompt (no sampling, so reproducible), prompt -> generated text only.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer
    prompts : tuple of str
    new_tokens : int
        Tokens generated after each prompt (fewer if the model emits end of sequence).
    progress : str, optional
        Label of a progress bar over the prompts (none if None).
    """
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for prompt in tqdm(prompts, desc=progress, disable=progress is None, leave=False):
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generated = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        out[prompt] = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return out
