"""The command line on the real LeNet and MNIST: report.json, reload, refusals."""

import json
import logging
import os
import stat

import pytest

from subprune.cli import main
from subprune.data import load_mnist
from subprune.evaluate import accuracy, count_parameters
from subprune.serialization import load_pruned

REPORT_KEYS = {
    "dense_accuracy", "pruned_accuracy", "dense_params", "pruned_params", "compression_ratio",
    "prune_seconds", "sites",
}


def test_prune_lenet_writes_report_and_reloadable_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "lenet", "--method", "asym", "--keep", "0.5", "--calib", "128",
                 "--seed", "0", "--out", str(out), "--quiet", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert REPORT_KEYS <= set(report)
    assert 0.97 <= report["dense_accuracy"] <= 1 and 0.5 <= report["pruned_accuracy"] <= 1
    assert report["compression_ratio"] == pytest.approx(report["dense_params"] / report["pruned_params"])
    assert report["compression_ratio"] > 2
    assert [(s["name"], s["channels"], s["kept"]) for s in report["sites"]] == [
        ("conv1", 6, 3), ("conv2", 16, 8), ("fc1", 120, 60), ("fc2", 84, 42)
    ]
    assert all(0 < s["objective"] <= 1 + 1e-9 for s in report["sites"])
    assert report["joint_refits"] == {}  # every LeNet consumer reads one site
    model = load_pruned(out)  # rebuilt from the registry name saved with it
    assert count_parameters(model) == report["pruned_params"]
    images, labels = load_mnist("test")
    assert accuracy(model, images, labels) == report["pruned_accuracy"]
    assert main(["evaluate", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--dataset", "fashion-mnist"]) == 2
    assert "trained on mnist, not fashion-mnist" in " ".join(capsys.readouterr().err.split())
    (out / "report.json").unlink()  # without the report the dataset comes from the registered base model
    assert main(["evaluate", str(out)]) == 0
    assert "on mnist" in capsys.readouterr().out
    arch = json.loads((out / "architecture.json").read_text())
    (out / "architecture.json").write_text(json.dumps({**arch, "base_model": "nosuch"}))
    assert main(["evaluate", str(out)]) == 2
    assert "architecture.json names base model 'nosuch'" in " ".join(capsys.readouterr().err.split())
    (out / "architecture.json").write_text(json.dumps(arch))
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (out, *out.iterdir()):  # published with the umask, not tempfile's private 0700/0600
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~mask, path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "--keep", "0"], "out of range"),
        (["prune", "--keep", "1.5"], "out of range"),
        (["prune", "--model", "resnet9000"], "invalid choice"),
        (["prune", "--keep-site", "fc1"], "NAME=RATIO"),
        (["prune", "--epsilon", "1"], "--epsilon 1.0 must be a finite number >= 0 and < 1"),
        (["prune", "--ridge", "nan"], "--ridge nan must be a finite number >= 0"),
        (["prune", "--batch-size", "0"], "--batch-size 0 must be an integer >= 1"),
        (["prune", "--compression", "inf"], "must be a finite number >= 1"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["prune", "--calib", "60000", "--quiet"], "--calib 60000 must be between 2 and the 50000"),
        (["prune", "--layers", "fc3", "--calib", "16", "--quiet"], "'fc3' cannot be pruned"),
        (["prune", "--keep-site", "bn9=0.5", "--calib", "16", "--quiet"], "unknown sites"),
        (["prune", "--method", "actgrad", "--budget", "accuracy", "--held-out", "0", "--quiet"], "--held-out 0"),
        (["prune", "--method", "actgrad", "--budget", "curve", "--calib", "16", "--quiet"], "sets its own budget"),
        (["prune", "--compression", "5000", "--calib", "16", "--quiet"], "cannot be reached"),
        (["prune", "--model", "lenet", "--dataset", "fashion-mnist", "--quiet"], "was trained on mnist"),
        (["prune", "--method", "wanda", "--quiet"], "--method wanda is for hf: (transformers) models only"),
        (["prune", "--held-out", "100", "--quiet"], "--held-out applies only to --budget accuracy"),
        (["prune", "--cache-dir", ".", "--calib", "16", "--quiet"], "--cache-dir applies to hf: (transformers) models"),
        (["prune", "--layers", " , ", "--quiet"], "--layers names no layer"),
        (["prune", "--keep-site", "conv2=0.5", "--keep-site", "conv2=0.25", "--quiet"], "names conv2 more than once"),
        (["prune", "--layers", "conv1", "--keep-site", "conv2=0.5", "--calib", "16", "--quiet"],
         "keep names sites ['conv2'] that layers= (CLI --layers) leaves out"),
    ],
)
def test_library_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_foreign_out_directory_is_not_touched(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["prune", "--calib", "16", "--quiet", "--out", str(tmp_path)]) == 2
    assert "not written by subprune" in " ".join(capsys.readouterr().err.split())
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_inspect_lists_sites_and_skipped(capsys):
    assert main(["inspect", "--model", "ccexam-mnistnet"]) == 0
    text = capsys.readouterr().out
    assert "features.0" in text and "classifier.0" in text
    assert "not prunable: classifier.2: its outputs are the model's outputs" in " ".join(text.split())


def test_prune_baseline_at_a_compression_ratio(tmp_path, capsys):
    code = main(["prune", "--model", "lenet", "--method", "layer-actgrad", "--compression", "8", "--calib", "512",
                 "--quiet", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compression_target"] == 8 and report["keep"] is None
    assert report["budget"] == "uniform" and report["reweight"]
    assert report["compression_ratio"] >= 8
    assert report["pruned_accuracy"] > 0.9  # 128 samples would nearly interpolate conv2 -> fc1 (125 columns)
    code = main(["prune", "--model", "lenet", "--method", "weightnorm", "--compression", "4", "--budget", "curve"])
    assert code == 2 and "sets its own budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --keep and --compression are exclusive
        main(["prune", "--keep", "0.5", "--compression", "4"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_inspect_lists_coupled_groups(capsys):
    assert main(["inspect", "--arch", "resnet18", "--coupled"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "coupled group layer2.0.downsample.0: 3 producers" in text
    assert main(["inspect", "--arch", "resnet18"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "coupled group" not in text and "not prunable: conv1: its channels are tied to" in text


def test_inspect_lists_option_a_shortcut_sites(capsys):
    assert main(["inspect", "--arch", "cifar-resnet20", "--coupled"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "coupled group layers.3.conv2[24:32]: 6 producers" in text and "not prunable: fc:" in text
    assert "zero-pads" not in text


def test_out_refuses_cwd_and_file_parents_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("mine")
    assert main(["prune", "--calib", "16", "--quiet", "--out", "."]) == 2
    assert "current directory" in capsys.readouterr().err
    assert main(["prune", "--calib", "16", "--quiet", "--out", "file.txt/sub"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_bad_threads_and_corrupt_save_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--threads", "-1"])
    assert "--threads -1 must be an integer >= 1" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    spec = {"format": "subprune-pruned-v1", "base_model": "lenet", "modules": {}}
    (tmp_path / "architecture.json").write_text(json.dumps(spec))
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_near_interpolating_refit_warns_naming_the_consumer(caplog):
    """128 rows for conv2 -> fc1's 125 refit columns (keep 5 of 16, 25 columns each): least squares at the
    double-descent peak. The warning names the site and the consumer and suggests a ridge."""
    with caplog.at_level(logging.WARNING, logger="subprune"):
        assert main(["prune", "--model", "lenet", "--method", "layer", "--keep-site", "conv2=0.3125",
                     "--layers", "conv2", "--calib", "128", "--quiet"]) == 0
    warned = [r.getMessage() for r in caplog.records if "refit columns" in r.getMessage()]
    assert warned == ["site conv2, consumer fc1: 128 calibration rows for 125 refit columns: the refit (nearly) "
                      "interpolates the calibration set and f(S) overstates what is kept; use more samples or a "
                      "ridge (PruneConfig(ridge=0.1), CLI --ridge 0.1)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="subprune"):  # no least squares at all: no warning
        assert main(["prune", "--model", "lenet", "--method", "layer-weightnorm", "--keep-site", "conv2=0.3125",
                     "--layers", "conv2", "--calib", "128", "--no-reweight", "--quiet"]) == 0
    assert not [r for r in caplog.records if "refit columns" in r.getMessage()]


@pytest.mark.parametrize("argv, problem", [(["prune", "--keep", "2"], "keep ratio 2.0 is out of range"),
                                           (["prune", "--calib", "abc"], "'abc' is not an integer"),
                                           (["frob"], "invalid choice: 'frob'")])
def test_argument_errors_are_one_line(argv, problem, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and problem in err and err.count("\n") == 1 and "--help" in err
