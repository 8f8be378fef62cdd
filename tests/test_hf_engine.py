"""The block engine: block executions counted with hooks, refits against direct least squares, the model untouched."""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_hf import LAYERS, bert, gpt2, llama, opt  # noqa: E402

from subprune.hf import TransformerPruneConfig, find_transformer_sites, prune_transformer  # noqa: E402
from subprune.hf.architectures import blocks  # noqa: E402
from subprune.solver import group_columns  # noqa: E402
from subprune.statistics import capture_inputs  # noqa: E402

BATCH = 8


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (40, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[:5, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("build", [bert, gpt2, llama, opt])
@pytest.mark.parametrize("method, per_batch", [("layer", 1), ("seq", 2), ("wanda", 2), ("asym", 3)])
def test_block_executions_are_bounded(build, method, per_batch, tokens):
    model = build()
    _, layers = blocks(model)
    calls = []
    # deepcopy carries forward hooks over, so the working copies of the blocks count too
    handles = [b.register_forward_pre_hook(lambda m, a: calls.append(1)) for b in layers]
    try:
        result = prune_transformer(model, tokens, TransformerPruneConfig(method=method, batch_size=BATCH))
    finally:
        for h in handles:
            h.remove()
    batches = -(-tokens["input_ids"].shape[0] // BATCH)
    assert len(calls) == result.block_executions == per_batch * LAYERS * batches
    assert result.batches == batches


@pytest.mark.parametrize("method, per_batch", [("layer", 1), ("seq", 1), ("asym", 2)])
def test_ffn_consumer_runs_once_per_stream(method, per_batch, tokens):
    """The FFN swap reuses the old consumer output of the statistics run; Asym's energies reuse the dense run's."""
    model = llama()
    _, layers = blocks(model)
    calls = []
    # hooks on the dense consumers travel into the working copies; a pruned consumer is a new module, uncounted
    handles = [b.mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(1)) for b in layers]
    handles += [b.self_attn.o_proj.register_forward_hook(lambda m, a, o: calls.append(2)) for b in layers]
    try:
        result = prune_transformer(model, tokens, TransformerPruneConfig(method=method, batch_size=BATCH))
    finally:
        for h in handles:
            h.remove()
    assert calls.count(1) == per_batch * LAYERS * result.batches  # down_proj: once per stream and batch
    # dense o_proj: Layer's one dense run and Asym's dense stream; the heads statistics run stops at its input and
    # the later runs of Seq/Asym hold the refit o_proj (a new module)
    assert calls.count(2) == {"layer": 1, "seq": 0, "asym": 1}[method] * LAYERS * result.batches


def _rows(model, name, tokens):
    captured = {}
    with capture_inputs({name: model.get_submodule(name)}, captured.__setitem__), torch.no_grad():
        model(**tokens)
    return captured[name].reshape(-1, captured[name].shape[-1])[tokens["attention_mask"].bool().reshape(-1)].double()


@pytest.mark.parametrize("build, method", [(llama, "asym"), (bert, "seq"), (gpt2, "asym")])
def test_last_block_refits_equal_least_squares_on_the_partly_pruned_model(build, method, tokens):
    """Heads of block 1 read the model with block 0 pruned; its FFN reads that model with block 1's heads pruned."""
    model = build()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method=method, heads=0.5, ffn=0.5))
    prefix, dense_layers = blocks(model)
    _, pruned_layers = blocks(result.model)
    heads, ffn = find_transformer_sites(model)[2:4]
    reports = {s.name: s for s in result.sites}

    # heads: block 0 pruned, block 1 dense
    hybrid = copy.deepcopy(result.model)
    blocks(hybrid)[1][1] = copy.deepcopy(dense_layers[1])
    head_cols = group_columns(torch.tensor(reports[heads.name].keep), heads.group_size)
    for site, cols, source in ((heads, head_cols, hybrid), (ffn, torch.tensor(reports[ffn.name].keep), None)):
        if source is None:  # FFN: block 0 and block 1's heads pruned, block 1's FFN dense
            source = copy.deepcopy(result.model)
            dense_block, hybrid_block = dense_layers[1], blocks(source)[1][1]
            for name, child in dense_block.named_children():
                if name in ("mlp", "intermediate", "output"):
                    setattr(hybrid_block, name, copy.deepcopy(child))
        b = _rows(source, site.consumer, tokens)[:, cols]  # (tokens, k g)
        a = _rows(model if method == "asym" else source, site.consumer, tokens)  # (tokens, d)
        consumer = model.get_submodule(site.consumer)
        w = (consumer.weight.detach().double() if type(consumer).__name__ == "Conv1D"
             else consumer.weight.detach().double().T)  # (d, m)
        expected = torch.linalg.lstsq(b, a @ w).solution  # (k g, m)
        new = result.model.get_submodule(site.consumer)
        got = new.weight.detach().double() if type(new).__name__ == "Conv1D" else new.weight.detach().double().T
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def test_user_model_untouched_and_nothing_shared(tokens):
    model = llama()
    model.train()  # the engine runs in eval mode and gives every module its flag back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", heads=0.5, ffn=0.5))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in result.model.parameters()}
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    assert not result.model.training


def test_curve_budget_layer_runs_blocks_once(tokens):
    model = gpt2()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="layer", budget="curve", batch_size=BATCH))
    assert result.block_executions == LAYERS * result.batches  # the dense statistics pass only


def test_spilled_caches_give_the_same_model_and_leave_no_file(tokens, tmp_path):
    from subprune.hf.engine import ActivationStore

    model = llama()
    config = dict(method="asym", batch_size=BATCH, params=0.6)
    plain = prune_transformer(model, tokens, TransformerPruneConfig(**config))
    spilled = prune_transformer(model, tokens, TransformerPruneConfig(cache_dir=str(tmp_path), **config))
    assert [s.keep for s in spilled.sites] == [s.keep for s in plain.sites]
    with torch.no_grad():
        assert torch.equal(spilled.model(**tokens).logits, plain.model(**tokens).logits)
    assert list(tmp_path.iterdir()) == []  # every mapped file was unlinked as soon as it was mapped
    store = ActivationStore(tmp_path)
    x = torch.randn(3, 4, 5)
    kept = store.keep(x)
    assert torch.equal(kept, x) and kept.is_shared() and store.spilled_bytes_ == x.numel() * 4
    with pytest.raises(ValueError, match="is not an existing directory"):
        TransformerPruneConfig(cache_dir=str(tmp_path / "missing"))


def test_one_block_on_the_compute_device_at_a_time(tokens, monkeypatch):
    """Each block's working copy goes to the device, runs, and goes back before the next one comes: a model
    larger than the device is pruned with one block there at a time. The user's blocks are never moved."""
    model = llama()
    _, layers = blocks(model)
    user_blocks = {id(b) for b in layers}
    block_type = type(layers[0])
    moves = []
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if isinstance(self, block_type):
            moves.append(id(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", batch_size=BATCH, device="cpu"))
    assert not user_blocks & set(moves)
    # pairs (to the device, back to the model's device), one block after the other, every block once
    assert len(moves) == 2 * LAYERS and moves[0::2] == moves[1::2] and len(set(moves)) == LAYERS
    assert set(moves) == {id(b) for b in blocks(result.model)[1]}


def test_a_refit_with_under_two_tokens_per_column_warns(caplog):
    """3 passages of 16 tokens (48 rows) for the FFN's kept columns: the refit nearly interpolates, as with 8 SmolLM2
    passages (perplexity 9.7e6 without a word said); the fx path warns below 2 rows per column too."""
    model = llama()
    few = {"input_ids": torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))}
    with caplog.at_level("WARNING"):
        prune_transformer(model, few, TransformerPruneConfig(method="layer", heads=1.0, ffn=0.5))
    messages = [r.getMessage() for r in caplog.records if "interpolates" in r.getMessage()]
    assert messages and "mlp.down_proj" in messages[0]
