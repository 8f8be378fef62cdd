"""The accuracy-sweep harness run for real on a tiny LeNet sweep: rows, resume, table and plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


def test_tiny_lenet_sweep_writes_rows_resumes_and_tabulates(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    sweep = _load("accuracy_sweep")
    out, table = tmp_path / "sweep.jsonl", tmp_path / "sweep.md"
    argv = ["--models", "lenet", "--targets", "compression", "--compressions", "4", "16", "--methods", "asym",
            "weightnorm", "--seeds", "1", "--calib", "256", "--reweight", "yes", "--finetune", "limited",
            "--finetune-epochs", "2", "--test-subset", "1000", "--out", str(out), "--table", str(table)]
    try:
        _run(sweep, monkeypatch, argv)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted((r["method"], r["compression_target"]) for r in rows) == [
            ("asym", 4.0), ("asym", 16.0), ("weightnorm", 4.0), ("weightnorm", 16.0)
        ]
        for r in rows:
            assert (r["model"], r["seed"], r["calib"], r["reweight"], r["test_subset"]) == ("lenet", 0, 256, True, 1000)
            assert (r["finetune"], r["finetune_epochs"], r["finetune_samples"]) == ("limited", 2, 256)
            assert r["dense_accuracy"] > 0.97
            assert 0.1 < r["pruned_accuracy"] <= r["dense_accuracy"] + 0.01
            assert 0.1 < r["finetuned_accuracy"] <= 1
            assert r["compression_target"] <= r["compression_ratio"] <= 1.15 * r["compression_target"]
            assert r["compression_ratio"] == pytest.approx(r["dense_params"] / r["pruned_params"])
            assert len(r["kept"]) == 4 and all(0 < f <= 1 + 1e-9 for f in r["objectives"])
        by = {(r["method"], r["compression_target"]): r for r in rows}
        assert by[("asym", 4.0)]["pruned_accuracy"] > 0.9  # x4 costs AsymInChange little
        assert by[("asym", 16.0)]["pruned_accuracy"] > by[("weightnorm", 16.0)]["pruned_accuracy"]
        text = table.read_text()
        assert text.startswith("Command: `python benchmarks/accuracy_sweep.py --models lenet")
        assert "### After fine-tuning (limited data)" in text and "| lenet | AsymInChange | yes |" in text
        first = table.read_text()

        def no_prune(*args, **kwargs):
            raise AssertionError("a finished run was pruned again")

        real_prune = sweep.prune
        monkeypatch.setattr(sweep, "prune", no_prune)  # the second invocation must resume, not redo
        _run(sweep, monkeypatch, argv)
        assert [json.loads(line) for line in out.read_text().splitlines()] == rows
        assert table.read_text() == first

        lines = out.read_text().splitlines(keepends=True)  # an interrupted write leaves half of the last row
        out.write_text("".join(lines[:3]) + lines[3][:40])
        calls = []
        monkeypatch.setattr(sweep, "prune", lambda *args, **kwargs: calls.append(1) or real_prune(*args, **kwargs))
        _run(sweep, monkeypatch, argv)  # drops the half row and redoes exactly that run
        resumed = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(calls) == 1 and resumed[:3] == [json.loads(line) for line in lines[:3]]
        assert {sweep.run_key(r) for r in resumed} == {sweep.run_key(r) for r in rows}
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "sweep.png"
        _run(_load("plot_sweep"), monkeypatch, [str(out), "--model", "lenet", "--out", str(png)])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_data_efficiency_sweep_runs_on_the_sweep_harness(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "efficiency.jsonl"
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports accuracy_sweep next to it
    try:
        _run(_load("data_efficiency"), monkeypatch, [
            "--models", "lenet", "--methods", "asym", "--calibs", "64", "256", "--compression", "8", "--seeds", "1",
            "--test-subset", "500", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["calib"], r["reweight"]) for r in rows) == [(64, False), (64, True), (256, False), (256, True)]
    assert all(r["test_subset"] == 500 and 8 <= r["compression_ratio"] <= 9.2 for r in rows)
    table = capsys.readouterr().out
    assert "| lenet | AsymInChange | yes |" in table and "64 samples | 256 samples" in table


@pytest.mark.parametrize(
    "argv,message",
    [(["--compressions", "4"], "--compressions needs --targets compression"),
     (["--targets", "compression", "--keeps", "0.5"], "--keeps applies to --targets keep only"),
     (["--targets", "compression", "--compressions", "0.5"], "--compressions must be >= 1"),
     (["--table-only"], "does not exist: --table-only tabulates an existing results file")],
)
def test_sweep_refuses_ignored_or_bad_targets(argv, message, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _run(_load("accuracy_sweep"), monkeypatch, [*argv, "--out", str(tmp_path / "x.jsonl")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
