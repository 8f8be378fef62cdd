"""LLM pruning pieces (issue 14): query-head units, FLAP's adaptive structure and bias compensation, the
partition-constrained greedy, the uniform parameter budget's fill. Tiny random LLaMA (GQA), offline."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from subprune.hf import TransformerPruneConfig, find_transformer_sites, load_pruned, prune_transformer, save_pruned  # noqa: E402
from subprune.hf.budget import TransformerParameterCounter, flap_plan, transformer_budget  # noqa: E402
from subprune.solver import refit  # noqa: E402
from subprune.solver_factored import greedy_select_factored  # noqa: E402

HIDDEN, HEADS, KV, FFN, LAYERS, VOCAB = 48, 6, 2, 64, 2, 100
HEAD_DIM = HIDDEN // HEADS


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FFN,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (16, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[:4, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits[tokens["attention_mask"].bool()]


def test_query_head_sites():
    sites = find_transformer_sites(llama(), units="qheads")
    heads = sites[0]
    assert (heads.channels, heads.group_size, heads.kv_groups) == (HEADS, HEAD_DIM, KV)
    assert [p.module for p in heads.producers] == ["model.layers.0.self_attn.q_proj"]
    assert find_transformer_sites(llama())[0].channels == KV  # default: key/value groups


def test_query_head_pruning_equals_zeroed_output_columns(tokens):
    """Dropping query heads 1 and 4 (one per group) without refit = zeroing their o_proj columns in the dense model."""
    model = llama()
    sites = find_transformer_sites(model, units="qheads")
    config = TransformerPruneConfig(method="magnitude", keep={sites[0].name: 4 / 6}, reweight=False, units="qheads")
    result = prune_transformer(model, tokens, config)
    keep = result.sites[0].keep
    assert len(keep) == 4 and sum(k < 3 for k in keep) == 2  # two heads of each key/value group
    zeroed = llama()
    dropped = sorted(set(range(HEADS)) - set(keep))
    with torch.no_grad():
        for h in dropped:
            zeroed.model.layers[0].self_attn.o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
    attn = result.model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * HEAD_DIM and attn.k_proj.out_features == KV * HEAD_DIM
    assert attn.num_key_value_groups == 2
    torch.testing.assert_close(logits(result.model, tokens), logits(zeroed, tokens), atol=1e-5, rtol=1e-5)


def test_query_head_save_reload_and_unequal_groups_refused(tokens, tmp_path):
    model = llama()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", heads=0.5, ffn=0.75,
                                                                     units="qheads"))
    assert all(len(s.keep) == 2 for s in result.sites if s.name.endswith("heads"))  # 3 rounded to 2 groups x 1
    save_pruned(result.model, tmp_path)
    torch.testing.assert_close(logits(load_pruned(tmp_path, transformers.AutoModelForCausalLM), tokens),
                               logits(result.model, tokens))
    from subprune.hf.architectures import prune_transformer_site_

    site = find_transformer_sites(llama(), units="qheads")[0]
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_transformer_site_(llama(), site, torch.tensor([0, 1, 3]))


def test_partition_greedy_is_the_best_feasible_first_step_and_meets_quotas():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(200, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                                 dtype=torch.float64)
    w = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    g = b.T @ b
    energy = float((w * (g @ w)).sum())
    parts = torch.tensor([0, 0, 0, 1, 1, 1])  # 6 groups of 2 columns, 2 parts
    result = greedy_select_factored(g, w, energy, 2, 4, parts=parts)
    assert torch.bincount(parts[result.order], minlength=2).tolist() == [2, 2]

    def f(keep):
        cols = torch.cat([torch.arange(2 * c, 2 * c + 2) for c in keep])
        w_new = torch.linalg.lstsq(b[:, cols], b @ w).solution
        return 1 - float((b[:, cols] @ w_new - b @ w).square().sum()) / energy

    torch.testing.assert_close(float(result.objective[-1]), f(sorted(result.order.tolist())), atol=1e-9, rtol=0)
    best = max((set(a) | set(c) for a in itertools.combinations(range(3), 2)
                for c in itertools.combinations(range(3, 6), 2)), key=lambda s: f(sorted(s)))
    assert f(sorted(result.order.tolist())) >= 0.9 * f(sorted(best))  # greedy under a partition matroid
    with pytest.raises(ValueError, match="multiple"):
        greedy_select_factored(g, w, energy, 2, 3, parts=parts)


def test_flap_adds_the_compensating_bias_to_a_bias_free_llama(tokens, tmp_path):
    model = llama()
    assert model.model.layers[0].mlp.down_proj.bias is None
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="flap", params=0.6, reweight=False))
    assert result.config.budget == "auto"
    down = result.model.model.layers[0].mlp.down_proj
    assert down.bias is not None
    # the bias is mean(X_pruned) W_pruned on the calibration tokens: recompute it from the dense inputs
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    logits(model, tokens)
    handle.remove()
    x = captured[0][tokens["attention_mask"].bool()].double()  # (tokens, FFN)
    keep = torch.tensor(next(s.keep for s in result.sites if s.name == "model.layers.0.ffn"))
    pruned = torch.ones(FFN, dtype=torch.bool)
    pruned[keep] = False
    expected = x[:, pruned].mean(0) @ model.model.layers[0].mlp.down_proj.weight.detach().double().T[pruned]
    torch.testing.assert_close(down.bias.detach().double(), expected, atol=1e-5, rtol=1e-5)
    save_pruned(result.model, tmp_path)
    torch.testing.assert_close(logits(load_pruned(tmp_path, transformers.AutoModelForCausalLM), tokens),
                               logits(result.model, tokens))


def test_flap_plan_ranks_globally_within_the_target():
    model = llama()
    sites = find_transformer_sites(model)
    counter = TransformerParameterCounter(model, sites)
    scores = {s.name: torch.linspace(1, 0, s.channels) + (5.0 if s.name == "model.layers.1.ffn" else 0.0)
              for s in sites}
    target = counter.count({s.name: 1 for s in sites}) + 20 * 3 * HIDDEN  # room for 20 more FFN neurons
    plan = flap_plan(sites, scores, counter, target)
    assert counter.count(plan) <= target
    assert plan["model.layers.1.ffn"] == 21 and plan["model.layers.0.ffn"] == 1  # the high scores win


def test_uniform_parameter_target_spends_the_leftover():
    model = llama()
    sites = find_transformer_sites(model)
    counter = TransformerParameterCounter(model, sites)
    plan = transformer_budget(sites, {}, counter=counter, params=0.5)
    target = counter.budget(counter.compression_for_fraction(0.5))
    per_neuron = 3 * HIDDEN
    assert target - per_neuron < counter.count(plan) <= target  # no whole FFN neuron left unspent
    ffn = [plan[s.name] for s in sites if s.name.endswith("ffn")]
    assert max(ffn) - min(ffn) <= 1


def test_refit_with_ridge_is_ridge_regression():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    g = b.T @ b
    keep = torch.tensor([0, 2, 5])
    lam = 1e-2 * float(g.diagonal().mean())
    expected = torch.linalg.solve(g[keep][:, keep] + lam * torch.eye(3, dtype=torch.float64), (g @ w)[keep])
    torch.testing.assert_close(refit(g, w, keep, 1, ridge=1e-2), expected)


def test_swap_search_objective_is_exact_and_never_below_greedy():
    from subprune.local_search import swap_search

    gen = torch.Generator().manual_seed(3)
    b = torch.randn(120, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen,
                                                                                 dtype=torch.float64)
    w = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    g = b.T @ b
    energy = float((w * (g @ w)).sum())

    def f(keep):
        w_new = torch.linalg.lstsq(b[:, keep], b @ w).solution
        return 1 - float((b[:, keep] @ w_new - b @ w).square().sum()) / energy

    best = max(f(list(c)) for c in itertools.combinations(range(10), 4))
    for start in ([0, 1, 2, 3], [6, 7, 8, 9]):
        keep, objective, swaps = swap_search(g, w, energy, 1, torch.tensor(start))
        torch.testing.assert_close(objective, f(keep.tolist()), atol=1e-9, rtol=0)
        assert objective >= f(start) - 1e-12 and keep.numel() == 4
        assert objective >= best - 0.05  # a local optimum of single swaps, close to the best 4 of 10
    keep, objective, _ = swap_search(g, w, energy, 2, torch.tensor([0]))  # one group of 2 kept: exhaustive
    best_one = max(f([2 * c, 2 * c + 1]) for c in range(5))
    torch.testing.assert_close(objective, best_one, atol=1e-9, rtol=0)
    parts = torch.tensor([0] * 5 + [1] * 5)
    keep, _, _ = swap_search(g, w, energy, 1, torch.tensor([0, 1, 5, 6]), parts=parts)
    assert torch.bincount(parts[keep], minlength=2).tolist() == [2, 2]  # swaps stay inside a part


def test_parameter_fraction_names_the_same_size_for_query_head_units(tokens):
    model = llama()
    sizes = {}
    for units in ("kv", "qheads"):
        result = prune_transformer(model, tokens, TransformerPruneConfig(method="magnitude", params=0.6,
                                                                         reweight=False, units=units))
        sizes[units] = sum(p.numel() for p in result.model.parameters())
    counter = TransformerParameterCounter(model, find_transformer_sites(model))
    target = counter.budget(counter.compression_for_fraction(0.6))
    assert target - 2 * 3 * HIDDEN * KV < sizes["qheads"] <= target  # within a step of neurons
    assert target - 2 * 3 * HIDDEN * KV < sizes["kv"] <= target


def _inputs(model, tokens, names):
    """Real-token rows (tokens, width) of the input of every module in ``names`` (block or consumer)."""
    from subprune.statistics import capture_inputs

    captured = {}
    with torch.no_grad(), capture_inputs({n: model.get_submodule(n) for n in names}, captured.__setitem__):
        model(**tokens)
    real = tokens["attention_mask"].bool()
    return {n: captured[n][real].double() for n in names}


def test_residual_target_refit_is_least_squares_of_the_output_plus_the_upstream_error(tokens):
    """Asym with target='residual': block 1's o_proj is refit to A W + (h_dense - h_pruned), the direct lstsq."""
    from subprune.solver import group_columns

    first, second = "model.layers.0.ffn", "model.layers.1.heads"
    config = dict(method="asym", target="residual")
    dense = llama()
    result = prune_transformer(dense, tokens, TransformerPruneConfig(keep={first: 0.5, second: 0.5}, **config))
    upstream = prune_transformer(dense, tokens, TransformerPruneConfig(keep={first: 0.5}, **config)).model
    consumer, block = "model.layers.1.self_attn.o_proj", "model.layers.1"
    a, h_d = (_inputs(dense, tokens, [consumer, block])[n] for n in (consumer, block))
    b, h_p = (_inputs(upstream, tokens, [consumer, block])[n] for n in (consumer, block))
    w = dense.get_submodule(consumer).weight.detach().double().T  # (d, HIDDEN)
    target = a @ w + (h_d - h_p)  # the sublayer's dense output plus the upstream residual error
    report = result.sites[1]
    cols = group_columns(torch.tensor(report.keep), report.group_size)
    expected = torch.linalg.lstsq(b[:, cols], target).solution
    got = result.model.get_submodule(consumer).weight.detach().double().T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    f = 1 - (target - b[:, cols] @ expected).square().sum() / target.square().sum()
    assert report.objective == pytest.approx(float(f), abs=1e-5)
    plain = prune_transformer(dense, tokens, TransformerPruneConfig(method="asym", keep={first: 0.5, second: 0.5}))
    assert plain.sites[0].keep == result.sites[0].keep  # no upstream error at the first pruned site: the same fit
    plain_w = plain.model.get_submodule(consumer).weight.detach().double().T
    assert (plain_w[: len(cols)] - got[: len(cols)]).abs().max() > 1e-3  # the upstream error changes the fit
    with pytest.raises(ValueError, match="only AsymInChange"):
        TransformerPruneConfig(method="seq", target="residual")
