"""benchmarks/llm_sweep.py without a model: the variant grammar and the table from merged rows."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("llm_sweep", BENCHMARKS / "llm_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "llm_sweep", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_variant_grammar_defaults_and_ratio_pin(monkeypatch):
    sweep = _load(monkeypatch)
    swap = sweep.Variant.parse("layer-swap")
    assert swap.config(0.5, 0).reweight is True  # greedy + swap refits like greedy
    assert sweep.Variant.parse("magnitude").config(0.5, 0).reweight is False
    assert sweep.Variant.parse("magnitude/refit").config(0.2, 1).reweight is True
    heads = sweep.Variant.parse("flap/heads@0.5")
    assert (heads.spec, heads.method, heads.kinds, heads.only_removed) == ("flap/heads", "flap", "heads", 0.5)
    config = heads.config(0.5, 2)
    assert (config.heads, config.ffn, config.params, config.seed, config.budget) == (0.5, None, 0.5, 2, "auto")
    assert sweep.Variant.parse("layer/qheads").config(0.5, 0).units == "qheads"
    assert sweep.Variant.parse("seq").only_removed is None


def _row(variant, removed, seed, wiki, lee):
    return {"variant": variant, "removed": removed, "seed": seed, "calib": 128, "wiki_ppl": wiki, "lee_ppl": lee,
            "params": 100, "decode_tps": float("nan"), "prune_seconds": 1.0, "prune_cpu_seconds": 1.0}


def test_table_only_merges_later_file_wins_and_keeps_header(tmp_path, monkeypatch):
    sweep = _load(monkeypatch)
    dense = {"variant": "dense", "wiki_ppl": 30.0, "lee_ppl": 40.0, "params": 200, "decode_tps": 5.0}
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in (dense, _row("seq", 0.5, 0, 100.0, 110.0),
                                                       _row("seq", 0.5, 1, 104.0, 114.0))) + "\n")
    second.write_text("\n".join(json.dumps(r) for r in (dense, _row("seq", 0.5, 1, 102.0, 112.0))) + "\n")
    table = tmp_path / "t.md"
    table.write_text("My header, by hand.\n\nCommand: `old`\n\nold table\n")
    monkeypatch.setattr(sys, "argv", ["llm_sweep.py", "--variants", "seq", "--table-only", "--out", str(first),
                                      "--merge", str(second), "--table", str(table)])
    sweep.main()
    text = table.read_text()
    assert text.startswith("My header, by hand.\n\nCommand: `HF_HUB_OFFLINE=1")
    assert "old table" not in text
    # seed 1 from the later file (102 / 112) replaces the earlier row: mean 101 / 111, std sqrt(2)
    assert "| 50% | seq (calib 128) | 2 | 101.0 ± 1.4 | 111.0 ± 1.4 |" in text
