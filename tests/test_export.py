"""Export: a plain-transformers directory for hf: saves with uniform widths (ONNX is in test_own_model.py)."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_hf import bert, gpt2, llama  # noqa: E402

from subprune.export import export_transformers  # noqa: E402
from subprune.hf import TransformerPruneConfig, prune_transformer, save_pruned  # noqa: E402


def _tokens():
    ids = torch.randint(3, 100, (6, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _first(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build, heads, auto", [(llama, 0.5, "AutoModelForCausalLM"),
                                                (gpt2, None, "AutoModelForCausalLM"),
                                                (bert, None, "AutoModel")])
def test_uniform_widths_load_in_plain_transformers(build, heads, auto, tmp_path):
    tokens = _tokens()
    pruned = prune_transformer(build(), tokens, TransformerPruneConfig(method="layer", heads=heads, ffn=0.5,
                                                                       progress=False)).model
    save_pruned(pruned, tmp_path / "save")
    export_transformers(tmp_path / "save", tmp_path / "plain")
    plain = getattr(transformers, auto).from_pretrained(tmp_path / "plain", local_files_only=True).eval()
    assert "subprune_widths" not in plain.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(_first(plain(**tokens)), _first(pruned(**tokens)), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert "checked equal" in (tmp_path / "plain" / "SUBPRUNE.md").read_text()


def test_pruned_heads_without_head_dim_and_non_uniform_widths_are_refused(tmp_path):
    tokens = _tokens()
    pruned = prune_transformer(bert(), tokens, TransformerPruneConfig(method="layer", heads=0.5, ffn=0.5,
                                                                      progress=False)).model
    save_pruned(pruned, tmp_path / "heads")
    with pytest.raises(ValueError, match="hidden / heads.*subprune.hf.load_pruned"):
        export_transformers(tmp_path / "heads", tmp_path / "plain")
    sites = [s.name for s in prune_transformer(bert(), tokens, TransformerPruneConfig(
        method="layer", heads=None, ffn=0.5, progress=False)).sites]
    keep = {name: (0.25 if i == 0 else 0.5) for i, name in enumerate(sites)}
    uneven = prune_transformer(bert(), tokens, TransformerPruneConfig(method="layer", keep=keep,
                                                                      progress=False)).model
    save_pruned(uneven, tmp_path / "uneven")
    with pytest.raises(ValueError, match="differ between blocks"):
        export_transformers(tmp_path / "uneven", tmp_path / "plain2")
