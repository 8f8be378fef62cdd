"""Real text that works offline: Wikipedia passages and labelled movie-review sentences.

All come with PyPI ``gensim`` 4.4.0 in ``gensim/test/test_data/`` (see the
project's DATA.md): a shortened English Wikipedia dump (106 articles, about
480k words), ``lee_background.cor`` (300 news articles) and
``pang_lee_polarity.cor`` (200 sentences labelled ``__label__pos`` /
``__label__neg``). The loaders return plain Python strings;
tokenisation is :func:`tokenize`, done with the model's own tokenizer.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
POLARITY_FILE = "pang_lee_polarity.cor"
LEE_FILE = "lee_background.cor"
_INSTALL = "pip install gensim==4.4.0 (the Makefile's install step does this)"


def gensim_test_data() -> Path:
    """Directory ``gensim/test/test_data`` of the installed gensim; ImportError naming the install."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ImportError(f"the Wikipedia and polarity text ship with gensim, which is not installed: {_INSTALL}")
    path = Path(spec.origin).parent / "test" / "test_data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: this gensim build has no test data; {_INSTALL}")
    return path


def wikipedia_passages(min_words: int = 40, max_words: int = 120) -> list[str]:
    """Plain-text paragraphs of the shortened Wikipedia dump, in article order.

    Markup is removed with gensim's ``filter_wiki``; paragraphs shorter than
    ``min_words`` (headings, lists, captions) are dropped and longer ones are cut
    into pieces of at most ``max_words`` words.

    Parameters
    ----------
    min_words, max_words : int
        Bounds on the words of one passage.

    Returns
    -------
    list of str
        4,374 passages for the defaults. Deterministic.

    Raises
    ------
    ImportError
        If gensim is not installed.
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.utils import file_or_filename

    passages = []
    with file_or_filename(str(gensim_test_data() / WIKI_FILE)) as handle:
        for _title, text, _page_id in extract_pages(handle):
            if text.lower().startswith("#redirect"):
                continue
            for paragraph in filter_wiki(text).split("\n"):
                words = re.sub(r"\s+", " ", re.sub("'{2,}", "", paragraph)).strip().split(" ")
                if len(words) < min_words or paragraph.lstrip().startswith(("|", "*", "!", "{")):
                    continue
                for start in range(0, len(words), max_words):
                    piece = words[start : start + max_words]
                    if len(piece) >= min_words:
                        passages.append(" ".join(piece))
    return passages


def split_passages(passages: list[str], n_calibration: int, n_heldout: int,
                   seed: int | None = None) -> tuple[list[str], list[str]]:
    """Calibration passages from the front (or drawn with ``seed``), held-out passages from the back: never overlapping.

    Parameters
    ----------
    passages : list of str
    n_calibration, n_heldout : int
        Passages to calibrate on and to hold out (the last ``n_heldout``).
    seed : int or None
        None: the first ``n_calibration`` passages. An int: ``n_calibration``
        distinct passages drawn with :func:`subprune.data.calibration_indices`
        from those before the held-out ones, kept in text order; the same seed
        gives the same passages.

    Raises
    ------
    ValueError
        If the two counts exceed the number of passages.
    """
    if n_calibration + n_heldout > len(passages):
        raise ValueError(f"asked for {n_calibration} + {n_heldout} passages, only {len(passages)} exist")
    heldout = passages[len(passages) - n_heldout :]
    if seed is None:
        return passages[:n_calibration], heldout
    from subprune.data import calibration_indices

    drawn = sorted(calibration_indices(len(passages) - n_heldout, n_calibration, seed).tolist())
    return [passages[i] for i in drawn], heldout


def lee_background_articles() -> list[str]:
    """The 300 news articles of gensim's ``lee_background.cor`` (Lee et al., 2005), one string each, in file order.

    A second held-out text, of another genre than the Wikipedia calibration
    passages: a pruned LLM that overfits its calibration text shows it here.
    """
    lines = (gensim_test_data() / LEE_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def polarity_sentences() -> tuple[list[str], Tensor]:
    """The 200 labelled movie-review sentences of Pang & Lee (gensim test data).

    Returns
    -------
    sentences : list of str
    labels : Tensor of shape (200,), int64
        1 for positive, 0 for negative.
    """
    sentences, labels = [], []
    for line in (gensim_test_data() / POLARITY_FILE).read_text(encoding="cp1252", errors="replace").splitlines():
        label, _, sentence = line.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            continue
        sentences.append(sentence.strip())
        labels.append(int(label == "__label__pos"))
    return sentences, torch.tensor(labels)


def tokenize(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, Tensor]:
    """Padded, truncated token ids and attention mask, shapes (N, T) with T <= max_length."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
