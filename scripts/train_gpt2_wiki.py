"""Train a small GPT-2 on the Wikipedia text of gensim's test data, for a few CPU minutes.

No decoder language model ships in any package here (DATA.md), so this makes
one to prune: a byte-level BPE tokenizer (``--vocab`` tokens) trained on the
training passages, and a GPT-2 (``--layers`` blocks, ``--hidden`` wide, ``--heads``
heads, FFN 4x) trained with AdamW on 128-token windows for ``--minutes``. The
last ``HELDOUT`` passages are never trained on: they are the held-out text of
the pruning benchmarks. Writes a ``save_pretrained`` directory (model +
tokenizer) and prints held-out perplexity. Usage::

    HF_HUB_OFFLINE=1 python scripts/train_gpt2_wiki.py --out runs/gpt2-wiki [--minutes 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from subprune.hf.evaluate import perplexity
from subprune.hf.text import split_passages, tokenize, wikipedia_passages

HELDOUT = 256


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def windows(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """All text joined by end-of-text tokens and cut into windows, shape (n_windows, length)."""
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).reshape(n, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpt2-wiki")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    passages = wikipedia_passages()
    train_text, heldout_text = split_passages(passages, len(passages) - HELDOUT, HELDOUT)
    tokenizer = train_tokenizer(train_text, args.vocab)
    data = windows(tokenizer, train_text, args.length)  # (n, length)
    heldout = tokenize(tokenizer, heldout_text, args.length)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                        n_positions=args.length, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{data.numel():,} training tokens, {sum(p.numel() for p in model.parameters()):,} parameters")
    start, step, budget = time.perf_counter(), 0, 60 * args.minutes
    while time.perf_counter() - start < budget:
        for batch in data[torch.randperm(data.shape[0], generator=generator)].split(args.batch_size):
            progress = min(1.0, (time.perf_counter() - start) / budget)
            for group in optimizer.param_groups:  # linear warm-up over 30 steps, then cosine-free linear decay
                group["lr"] = args.lr * min(1.0, (step + 1) / 30) * (1.0 - 0.9 * progress)
            model.train()
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}, {time.perf_counter() - start:.0f} s, train loss {loss.item():.3f}", flush=True)
            if time.perf_counter() - start >= budget:
                break
    model.eval()
    print(f"{step} steps; held-out perplexity {perplexity(model, heldout):.2f}")
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
