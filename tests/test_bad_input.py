"""Bad input is refused with a clear message, and nothing the user owns is changed."""

import json

import pytest
import torch
from conftest import make_conv_net
from torch import nn

from subprune import saving
from subprune.pipeline import PruneConfig, prune
from subprune.serialization import load_pruned, save_pruned
from subprune.sites import TraceError, UnprunableLayerError
from subprune.statistics import NonFiniteActivationError


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, state):
    for k, v in model.state_dict().items():
        assert torch.allclose(v, state[k], rtol=0, atol=0, equal_nan=True), k
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan"), {"fc1": 2.0}])
def test_keep_ratio_out_of_range(keep):
    with pytest.raises(ValueError, match="keep ratio .* out of range"):
        PruneConfig(keep=keep)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"method": "magic"}, "unknown"), ({"epsilon": 1.0}, "epsilon"), ({"ridge": -1.0}, "ridge"),
     ({"batch_size": 0}, "batch_size")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


def test_too_few_samples_and_non_finite_inputs(conv_net, images):
    state = _state(conv_net)
    with pytest.raises(ValueError, match="too few calibration samples"):
        prune(conv_net, images[:1])
    bad = images.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune(conv_net, bad)
    with pytest.raises(TypeError, match="DataLoader"):  # names the forms it takes
        prune(conv_net, 3.0)
    _assert_unchanged(conv_net, state)


def test_nan_activations_name_the_layer(images):
    model = make_conv_net()
    with torch.no_grad():
        model.fc1.bias[0] = float("nan")
    state = _state(model)
    with pytest.raises(NonFiniteActivationError, match="fc2"):
        prune(model, images, PruneConfig(method="seq", keep=0.5, progress=False))
    _assert_unchanged(model, state)
    with torch.no_grad():
        model.fc1.bias[0] = 0.0
        model.fc1.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight of 'fc1' holds NaN"):
        prune(model, images, PruneConfig(method="seq", keep=0.5, progress=False))


def test_wrong_shapes_and_untraceable_models(conv_net, images):
    state = _state(conv_net)
    with pytest.raises(TraceError, match=r"does not run on samples of shape \(3, 14, 14\) and dtype float32"):
        prune(conv_net, torch.randn(8, 3, 14, 14))
    with pytest.raises(TraceError, match="dtype float64"):
        prune(conv_net, images.double())
    _assert_unchanged(conv_net, state)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.b(self.a(x))

    with pytest.raises(TraceError, match="could not trace"):
        prune(Branchy(), torch.randn(8, 4))


def test_unprunable_or_unknown_layer_requested(conv_net, images):
    with pytest.raises(UnprunableLayerError, match="'head' cannot be pruned: its outputs are the model's outputs"):
        prune(conv_net, images, PruneConfig(layers=("head",), progress=False))
    with pytest.raises(UnprunableLayerError, match="not a Linear/Conv2d .* prunable layers: conv1, conv2"):
        prune(conv_net, images, PruneConfig(layers=("nope",), progress=False))
    with pytest.raises(ValueError, match="unknown sites"):
        prune(conv_net, images, PruneConfig(keep={"bn1": 0.5}, progress=False))


def test_save_reload_identical_and_atomic(tmp_path, conv_net, images, monkeypatch):
    result = prune(conv_net, images, PruneConfig(method="asym", keep=0.5, progress=False))
    out = save_pruned(result.model, tmp_path / "pruned", extra_json={"report.json": {"a": 1}})
    reloaded = load_pruned(out, model=make_conv_net(seed=5))  # any instance of the dense architecture
    assert str(reloaded) == str(result.model)
    for (k1, v1), (k2, v2) in zip(reloaded.state_dict().items(), result.model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    torch.testing.assert_close(reloaded(images), result.model(images), atol=0, rtol=0)
    assert json.loads((out / "report.json").read_text()) == {"a": 1}

    # a failure mid-way leaves the previous save intact and no temporary folder behind
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "_fsync_tree", boom)  # after the files are written, before the swap
    with pytest.raises(OSError, match="disk full"):
        save_pruned(conv_net, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    torch.testing.assert_close(load_pruned(out, model=make_conv_net())(images), result.model(images))
    # a directory holding the user's own files is never replaced without overwrite=True
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        save_pruned(result.model, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    monkeypatch.undo()
    save_pruned(result.model, mine, overwrite=True)
    assert not (mine / "thesis.tex").exists()
    with pytest.raises(FileNotFoundError, match="not a model saved by subprune"):
        load_pruned(tmp_path)
    with pytest.raises(ValueError, match="no registered base model"):
        load_pruned(out)
    # extra files may not escape the save or replace its own files
    for name in ("../evil.json", "sub/x.json", "", "architecture.json", "model.safetensors"):
        with pytest.raises(ValueError, match="extra_json name"):
            save_pruned(result.model, tmp_path / "other", extra_json={name: {}})
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "other").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned(tmp_path / "nowhere")


def _damage(out, edit):
    spec = json.loads((out / "architecture.json").read_text())
    edit(spec)
    (out / "architecture.json").write_text(json.dumps(spec))


@pytest.mark.parametrize(
    "edit,match",
    [(lambda s: s["modules"]["fc1"]["config"].update(out_features=10**7), "out_features=10000000"),
     (lambda s: s["modules"]["fc1"]["config"].update(in_features=-5), "in_features=-5"),
     (lambda s: s["modules"]["fc1"]["config"].update(bias=False), "bias=False, the dense model True"),
     (lambda s: s["modules"].pop("fc1"), "does not match"),
     (lambda s: s.update(modules=[]), "no 'modules' mapping")],

)
def test_damaged_save_names_the_file(tmp_path, conv_net, images, edit, match):
    result = prune(conv_net, images, PruneConfig(method="layer", keep=0.5, progress=False))
    out = save_pruned(result.model, tmp_path / "pruned")
    _damage(out, edit)
    with pytest.raises(ValueError, match=match) as info:
        load_pruned(out, model=make_conv_net())
    assert "architecture.json" in str(info.value)


def test_damaged_files_are_named(tmp_path, conv_net, images):
    result = prune(conv_net, images, PruneConfig(method="layer", keep=0.5, progress=False))
    out = save_pruned(result.model, tmp_path / "pruned")
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:20])
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        load_pruned(out, model=make_conv_net())
    (out / "model.safetensors").write_bytes(weights)
    (out / "architecture.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="architecture.json is not valid JSON"):
        load_pruned(out, model=make_conv_net())
