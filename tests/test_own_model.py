"""The user's own model and data from the CLI and the API: factories, weights files, data files, saves, export."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import make_conv_net
from safetensors.torch import save_file

from subprune import PruneConfig, load_pruned, prune, save_pruned
from subprune.cli import main
from subprune.datafiles import ImageSettings, load_inputs, load_texts
from subprune.models.sources import ModelSource, load_state_file, parse_model

MODEL_FILE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

def build(classes=4):
    torch.manual_seed(0)
    return Net(classes)
'''


@pytest.fixture
def user(tmp_path):
    """A model file, its weights (.pt and .safetensors), 16x16 grayscale data as .npy and as a PNG class folder."""
    from PIL import Image

    (tmp_path / "my_net.py").write_text(MODEL_FILE)
    source = parse_model(f"{tmp_path / 'my_net.py'}:build")
    model = source.build()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    save_file(model.state_dict(), str(tmp_path / "net.safetensors"))
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(120, 1, 16, 16, generator=g) * 255).round() / 255
    np.save(tmp_path / "calib.npy", images.numpy())
    for i in range(40):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return tmp_path, model, images


def test_model_forms_are_parsed_and_named(tmp_path):
    assert parse_model("lenet") == ModelSource("registered", "lenet")
    assert parse_model("timm:resnet18", kwargs='{"num_classes": 10}') == ModelSource("timm", "resnet18",
                                                                                     {"num_classes": 10})
    assert parse_model("torchvision:resnet18").kind == "torchvision"
    assert parse_model("tests.conftest:make_mlp").target == "tests.conftest:make_mlp"
    assert parse_model("nets.py:build").target == f"{(tmp_path.cwd() / 'nets.py').resolve()}:build"
    with pytest.raises(ValueError, match="module.path:factory or file.py:factory"):
        parse_model("resnet")
    with pytest.raises(ValueError, match="not JSON"):
        parse_model("timm:resnet18", kwargs="{num_classes: 10}")
    with pytest.raises(FileNotFoundError, match="FILE.py:factory"):
        parse_model(str(tmp_path / "missing.py") + ":build").build()
    with pytest.raises(ImportError, match="importable module"):
        parse_model("no_such_module_here:build").build()


def test_module_factory_builds_and_missing_timm_names_the_install(monkeypatch):
    model = parse_model("conftest:make_mlp").build()
    assert isinstance(model, torch.nn.Sequential) and model[0].in_features == 10
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install (--no-deps )?timm"):
        parse_model("timm:resnet18").build()


def test_weights_files_load_and_keep_their_dtype(user, tmp_path):
    root, model, _ = user
    for name in ("net.pt", "net.safetensors"):
        loaded = parse_model(f"{root / 'my_net.py'}:build", weights=str(root / name)).load()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
    wrapped = {"state_dict": {f"module.{k}": v.double() for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "checkpoint.pth")  # a training checkpoint of a DataParallel model, float64
    loaded = parse_model(f"{root / 'my_net.py'}:build", weights=str(tmp_path / "checkpoint.pth")).load()
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="num_classes"):
        parse_model(f"{root / 'my_net.py'}:build", weights=str(root / "net.pt"), kwargs={"classes": 3}).load()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read") as damaged:
        load_state_file(str(tmp_path / "junk.pt"))
    assert "\n" not in str(damaged.value) and "weights_only" not in str(damaged.value)  # one line, no unsafe advice
    torch.save(model, tmp_path / "whole.pt")  # a whole pickled model: the safe load refuses its classes
    with pytest.raises(ValueError, match="pickled Python objects") as pickled:
        load_state_file(str(tmp_path / "whole.pt"))
    assert "\n" not in str(pickled.value)
    with pytest.raises(ValueError, match="is a directory, not a weights file"):
        load_state_file(str(tmp_path))


def test_api_save_records_the_source_dtype_and_frozen_parameters(user, tmp_path):
    root, _, images = user
    source = parse_model(f"{root / 'my_net.py'}:build", weights=str(root / "net.pt"))
    model = source.load().double()
    model.conv1.requires_grad_(False)
    pruned = prune(model, images[:64].double(), PruneConfig(keep=0.5, progress=False)).model
    save_pruned(pruned, tmp_path / "save", source=source)
    again = load_pruned(tmp_path / "save")  # no model instance: rebuilt from the recorded factory
    assert {p.dtype for p in again.parameters()} == {torch.float64}
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == {"conv1.weight", "conv1.bias"}
    x = images[64:].double()
    torch.testing.assert_close(again(x), pruned(x), rtol=0, atol=0)
    record = json.loads((tmp_path / "save" / "architecture.json").read_text())
    assert record["source"]["kind"] == "factory" and record["frozen"] == ["conv1.weight", "conv1.bias"]


def test_data_files_in_every_form(user, tmp_path):
    root, _, images = user
    folder = load_inputs(root / "images")
    assert folder.inputs.shape == (40, 1, 16, 16) and folder.classes == ["class0", "class1"]
    assert folder.labels.tolist() == [0] * 20 + [1] * 20  # sorted by class folder
    torch.testing.assert_close(folder.inputs[0], images[0], rtol=0, atol=1e-6)  # class0/0.png
    resized = load_inputs(root / "images", ImageSettings(size=(8, 8), mean=(0.5,), std=(0.25,), channels=3))
    assert resized.inputs.shape == (40, 3, 8, 8)
    assert load_inputs(root / "calib.npy").inputs.shape == (120, 1, 16, 16)
    torch.save({"x": images[:10], "labels": torch.arange(10)}, tmp_path / "xy.pt")
    pt = load_inputs(tmp_path / "xy.pt")
    assert pt.inputs.shape == (10, 1, 16, 16) and pt.labels.tolist() == list(range(10))
    save_file({"x": images[:6].flatten(1).contiguous(), "mask": torch.ones(6, 256)}, str(tmp_path / "two.safetensors"))
    two = load_inputs(tmp_path / "two.safetensors")
    assert set(two.inputs) == {"x", "mask"} and two.labels is None
    (tmp_path / "t.jsonl").write_text('{"text": "first passage"}\n\n{"text": "second"}\n')
    (tmp_path / "t.txt").write_text("one line\n\nanother line\n")
    assert load_texts(tmp_path / "t.jsonl") == ["first passage", "second"]
    assert load_inputs(tmp_path / "t.txt").texts == ["one line", "another line"]


def test_data_file_mistakes_name_the_fix(user, tmp_path):
    from PIL import Image

    root, _, _ = user
    Image.new("L", (20, 12)).save(root / "images" / "class0" / "odd.png")
    with pytest.raises(ValueError, match="--resize"):
        load_inputs(root / "images")
    Image.new("L", (16, 16)).save(root / "images" / "loose.png")
    with pytest.raises(ValueError, match="one class sub-folder"):
        load_inputs(root / "images")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(ValueError, match='no "text" string'):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="not understood"):
        load_inputs(root / "my_net.py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inputs(tmp_path / "nothing")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_datasets_directory(tmp_path):
    import datasets

    rows = {"pixel_values": np.random.default_rng(0).random((12, 1, 16, 16)).astype(np.float32).tolist(),
            "label": [i % 3 for i in range(12)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    loaded = load_inputs(tmp_path / "ds")
    assert loaded.inputs.shape == (12, 1, 16, 16) and loaded.labels.tolist() == rows["label"]
    datasets.Dataset.from_dict({"text": ["a b c", "d e f"]}).save_to_disk(str(tmp_path / "texts"))
    assert load_inputs(tmp_path / "texts").texts == ["a b c", "d e f"]


def test_cli_prune_evaluate_export_a_file_factory_model(user, capsys):
    root, model, images = user
    for data in ("images", "calib.npy"):
        out = root / f"pruned-{data}"
        assert main(["prune", "--model", f"{root / 'my_net.py'}:build", "--weights", str(root / "net.safetensors"),
                     "--data", str(root / data), "--keep", "0.5", "--calib", "24", "--quiet",
                     "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["model_source"]["kind"] == "factory" and report["pruned_params"] < report["dense_params"]
        assert report["held_out_samples"] == (16 if data == "images" else 96)
        assert ("dense_accuracy" in report) == (data == "images")  # class folders give labels
        capsys.readouterr()
        assert main(["evaluate", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"top-1 agreement with the dense model {report['agreement']:.2%}" in printed
        pruned = load_pruned(out)
        assert pruned.conv1.out_channels == 4 and pruned.fc1.out_features == 12
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed")
    assert main(["export", str(root / "pruned-calib.npy"), "--onnx", str(root)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (root / "m.onnx").write_text("the user's own file")
    assert main(["export", str(root / "pruned-calib.npy"), "--onnx", str(root / "m.onnx")]) == 2
    assert "exists" in capsys.readouterr().err and (root / "m.onnx").read_text() == "the user's own file"
    assert main(["export", str(root / "pruned-calib.npy"), "--onnx", str(root / "m.onnx"), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and (root / "m.onnx").is_file()
    assert [p.name for p in root.iterdir() if ".partial-" in p.name] == []  # written aside, then renamed
    if importlib.util.find_spec("onnxruntime") is not None:
        from subprune.export import onnx_parity

        worst = float(printed.split("max |difference| = ")[1].split()[0])
        assert worst <= 1e-4
        pruned = load_pruned(root / "pruned-calib.npy")
        assert onnx_parity(pruned, root / "m.onnx", images[:37]) <= 1e-4  # another batch size: the axis is dynamic


def test_evaluate_without_weights_does_not_compare_with_a_new_random_model(user, capsys):
    root, _, _ = user
    out = root / "random"
    assert main(["prune", "--model", f"{root / 'my_net.py'}:build", "--data", str(root / "images"), "--keep", "0.5",
                 "--calib", "24", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "without --weights" in printed and "agreement with the dense model" not in printed
    assert "accuracy" in printed  # the class folders still give the pruned model's accuracy


def test_cli_errors_for_own_models(user, capsys):
    root, _, _ = user
    factory = f"{root / 'my_net.py'}:build"
    assert main(["prune", "--model", factory, "--quiet"]) == 2
    assert "needs calibration inputs: pass --data PATH" in capsys.readouterr().err
    assert main(["prune", "--model", factory, "--data", str(root / "calib.npy"), "--method", "layer-actgrad"]) == 2
    assert "needs labels" in capsys.readouterr().err
    assert main(["prune", "--model", factory, "--data", str(root / "calib.npy"), "--finetune", "limited"]) == 2
    assert "not supported with --data" in capsys.readouterr().err


def _timm_importable() -> bool:
    try:
        from subprune.models.sources import import_timm

        import_timm()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _timm_importable(), reason="timm is not installed (make zoo-extras)")
def test_timm_model_from_the_cli_and_its_own_preprocessing(tmp_path):
    from subprune.datafiles import timm_settings

    source = parse_model("timm:resnet18", kwargs={"num_classes": 4})
    settings = timm_settings(source.build())
    assert settings.size == (224, 224) and settings.mean == pytest.approx((0.485, 0.456, 0.406))
    import argparse

    from subprune.usercli import image_settings

    flags = argparse.Namespace(resize="64", mean=None, std=None, channels=None)
    resized = image_settings(flags, source, source.build())  # --resize overrides the size only
    assert (resized.size, resized.channels, resized.mean) == ((64, 64), 3, settings.mean)
    np.save(tmp_path / "x.npy", torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy())
    out = tmp_path / "r18"
    assert main(["prune", "--model", "timm:resnet18", "--model-kwargs", '{"num_classes": 4}', "--data",
                 str(tmp_path / "x.npy"), "--method", "layer", "--keep", "0.5", "--calib", "16", "--quiet",
                 "--out", str(out)]) == 0
    pruned = load_pruned(out)  # rebuilt with timm.create_model from the recorded source
    report = json.loads((out / "report.json").read_text())
    assert sum(p.numel() for p in pruned.parameters()) == report["pruned_params"] < report["dense_params"]


def test_list_shows_every_method_and_model_form(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    for name in ("magnitude", "wanda", "flap", "asym", "timm:NAME", "hf:PATH", "module:factory"):
        assert name in printed


def test_onnx_export_of_a_two_input_model(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from test_calibration import TwoInputs, _two_input_data

    from subprune.export import export_onnx, onnx_parity

    x, mask = _two_input_data()
    pruned = prune(TwoInputs().eval(), (x, mask), PruneConfig(keep=0.5, progress=False)).model
    path = export_onnx(pruned, (x[:2], mask[:2]), tmp_path / "two.onnx")
    assert onnx_parity(pruned, path, (x, mask)) <= 1e-4


def test_conv_net_keeps_float64_through_onnx_free_reload(tmp_path, images):
    model = make_conv_net().double()
    pruned = prune(model, images.double(), PruneConfig(keep=0.5, progress=False)).model
    save_pruned(pruned, tmp_path / "s")
    again = load_pruned(tmp_path / "s", make_conv_net())  # a float32 instance: the save's float64 wins
    assert {p.dtype for p in again.parameters()} == {torch.float64}
