"""Arguments checked once at every entry point; saved architectures checked against the dense model before building."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest
import torch
from conftest import make_conv_net
from torch import nn

from subprune import cli
from subprune.hf.prune import TransformerPruneConfig
from subprune.pipeline import PruneConfig, prune
from subprune.saving import SaveInterrupted
from subprune.serialization import load_pruned, save_pruned


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5),
                                   torch.tensor([0.5]), 0.5])
def test_numpy_and_torch_scalars_are_numbers(value):
    config = PruneConfig(keep=value, epsilon=np.float32(0.25), ridge=torch.tensor(0.1), batch_size=np.int64(64),
                         seed=torch.tensor(3), reweight=np.bool_(True))
    assert (config.keep, config.batch_size, config.seed, config.reweight) == (0.5, 64, 3, True)
    assert type(config.keep) is float and type(config.batch_size) is int and type(config.ridge) is float
    assert PruneConfig(keep={"fc1": np.float16(0.5)}).keep == {"fc1": 0.5}
    assert PruneConfig(keep=None, compression=np.int32(4)).compression == 4.0
    t = TransformerPruneConfig(heads=value, ffn=np.float32(0.25), params=None, batch_size=np.int16(8))
    assert (t.heads, t.ffn, t.batch_size) == (0.5, 0.25, 8)
    json.dumps([config.keep, config.ridge, t.heads])  # plain numbers: the report can hold them


@pytest.mark.parametrize("kwargs,error,match", [
    ({"keep": "0.5"}, TypeError, "keep ratio must be a number, got str '0.5'"),
    ({"keep": torch.tensor([0.5, 0.5])}, TypeError, "keep ratio must be a number, got Tensor"),
    ({"keep": None, "compression": "4"}, TypeError, "compression must be a number, got str"),
    ({"batch_size": 1.5}, TypeError, "batch_size must be an integer, got float 1.5"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be an integer, got float 2.0"),
    ({"seed": -1}, ValueError, "seed=-1 is out of range"),
    ({"reweight": "no"}, TypeError, "reweight must be True or False, got str 'no'"),
    ({"method": 3}, TypeError, "method must be a string"),
    ({"epsilon": float("nan")}, ValueError, "epsilon=nan is out of range"),
    ({"ridge": float("inf")}, ValueError, "ridge=inf is out of range"),
    ({"keep": {1: 0.5}}, TypeError, "keep names sites by their names"),
    ({"layers": 3}, TypeError, "layers must be producer names"),
    ({"device": "gpu"}, ValueError, "device='gpu' is not a torch device name"),
    ({"chunk_bytes": 0}, ValueError, "chunk_bytes=0 is out of range"),
])
def test_config_names_the_parameter_and_the_type(kwargs, error, match):
    with pytest.raises(error, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"heads": "0.5"}, TypeError, "keep ratio heads must be a number, got str"),
    ({"ffn": 1.5}, ValueError, "keep ratio ffn 1.5 is out of range"),
    ({"params": np.float32(0.0)}, ValueError, r"params=0.0 is out of range: it must be in \(0, 1\]"),
    ({"batch_size": 1.5}, TypeError, "batch_size must be an integer"),
    ({"intercept": 1}, TypeError, "intercept must be True or False, got int 1"),
    ({"keep": [0.5]}, TypeError, "keep must map site names"),
])
def test_transformer_config_names_the_parameter_and_the_type(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformerPruneConfig(**kwargs)


def test_prune_arguments(images):
    model = make_conv_net()
    with pytest.raises(TypeError, match="config must be a PruneConfig .* got dict"):
        prune(model, images, {})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got None"):
        prune(None, images)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        prune(model, images, PruneConfig(progress=False), loss_fn=3)
    meta = make_conv_net().to("meta")
    with pytest.raises(ValueError, match="model has .* on the meta device .* load its weights first"):
        prune(meta, images)
    with pytest.raises(ValueError, match="calibration is on the meta device"):
        prune(model, images.to("meta"))


def test_transformer_prune_arguments():
    transformers = pytest.importorskip("transformers")
    from subprune.hf.prune import prune_transformer

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    with torch.device("meta"):
        meta = transformers.BertModel(config)
    ids = torch.randint(0, 50, (4, 8))
    with pytest.raises(ValueError, match="meta device"):
        prune_transformer(meta, {"input_ids": ids})
    model = transformers.BertModel(config).eval()
    with pytest.raises(TypeError, match="config must be a TransformerPruneConfig, got dict"):
        prune_transformer(model, {"input_ids": ids}, {})
    with pytest.raises(ValueError, match=r"calibration\['input_ids'\] is on the meta device"):
        prune_transformer(model, {"input_ids": ids.to("meta")})


def test_save_and_load_arguments(tmp_path):
    model = make_conv_net()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got None$"):
        save_pruned(None, tmp_path / "a")
    with pytest.raises(TypeError, match="directory must be a path .* got int 3"):
        save_pruned(model, 3)
    with pytest.raises(TypeError, match=r"extra_json\['report.json'\] cannot be written as JSON"):
        save_pruned(model, tmp_path / "a", extra_json={"report.json": {"x": object()}})
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        save_pruned(model, tmp_path / "a", overwrite="yes")
    with pytest.raises(TypeError, match="directory must be a path"):
        load_pruned(None)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        load_pruned(tmp_path, model="lenet")
    assert list(tmp_path.iterdir()) == []  # nothing was written


def _edit(out, name, **changes):
    spec = json.loads((out / "architecture.json").read_text())
    spec["modules"][name]["config"].update(changes)
    (out / "architecture.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("name,changes,match", [
    ("conv1", {"kernel_size": [20000, 20000]}, r"kernel_size=\[20000, 20000\], the dense model \[3, 3\]"),
    ("conv2", {"stride": [0, 0]}, r"stride=\[0, 0\], the dense model \[1, 1\]"),
    ("conv2", {"padding": [10**6, 10**6]}, r"padding=\[1000000, 1000000\], the dense model \[1, 1\]"),
    ("conv2", {"dilation": [7, 7]}, "dilation="),
    ("conv2", {"groups": 5}, r"groups=5; a pruned groups is an integer in 1..1"),
    ("bn1", {"eps": -1.0}, "eps=-1.0, the dense model 1e-05; pruning never changes eps"),
    ("bn1", {"momentum": "fast"}, "momentum='fast'"),
    ("bn1", {"num_features": 0}, r"num_features=0; a pruned num_features is an integer in 1..6"),
    ("fc1", {"out_features": 2.5}, "out_features=2.5"),
    ("fc1", {"out_features": 2.0}, r"out_features=2.0; a pruned out_features is an integer in 1..20"),
    ("fc1", {"extra": 1}, r"has keys \['extra'\] it should not have"),
])
def test_saved_architecture_is_checked_before_building(tmp_path, name, changes, match):
    out = save_pruned(make_conv_net(), tmp_path / "pruned")
    _edit(out, name, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as info:
        load_pruned(out, model=make_conv_net())
    assert time.perf_counter() - start < 2  # refused before allocating anything large
    assert f"architecture.json: module '{name}'" in str(info.value)


def test_grouped_conv_groups_are_bounded_by_the_dense_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    out = save_pruned(model, tmp_path / "p")
    _edit(out, "0", groups=8)
    with pytest.raises(ValueError, match=r"groups=8; a pruned groups is an integer in 1..4"):
        load_pruned(out, model=model)
    _edit(out, "0", groups=3)
    with pytest.raises(ValueError, match="groups=3, which does not divide in_channels=4"):
        load_pruned(out, model=model)


def test_the_interpolation_warning_does_not_suggest_the_ridge_that_is_set(images, caplog):
    small = images[:12]  # 12 samples x 9 patch rows: fewer rows than twice the refit columns
    with caplog.at_level(logging.WARNING):
        prune(make_conv_net(), small, PruneConfig(method="layer", keep=0.5, ridge=0.1, progress=False))
    messages = [r.getMessage() for r in caplog.records if "interpolates" in r.getMessage()]
    assert messages and all("larger ridge than the 0.1 set (PruneConfig(ridge=1)" in m for m in messages)
    assert not any("(PruneConfig(ridge=0.1)" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prune(make_conv_net(), small, PruneConfig(method="layer", keep=0.5, progress=False))
    assert any("or a ridge (PruneConfig(ridge=0.1)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("argv,message", [
    (["--threads", "x"], "argument --threads: --threads 'x' is not an integer"),
    (["--threads", "0"], "argument --threads: --threads 0 must be an integer >= 1"),
    (["--calib", "1.5"], "argument --calib: --calib '1.5' is not an integer"),
    (["--calib", "1"], "argument --calib: --calib 1 must be an integer >= 2 (see"),  # the same bound as the data layer
    (["--seed", "-3"], "argument --seed: --seed -3 must be an integer >= 0 (see"),
    (["--held-out", "-1"], "argument --held-out: --held-out -1 must be an integer >= 0"),
    (["--finetune-epochs", "0"], "argument --finetune-epochs: --finetune-epochs 0 must be an integer >= 1"),
])
def test_cli_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", *argv])
    assert message in capsys.readouterr().err


def test_cli_interrupt_messages_are_true(monkeypatch, capsys, tmp_path):
    def before_saving(args, console):
        raise KeyboardInterrupt

    def after_saving(args, console):
        args.saved_to = str(tmp_path)
        raise KeyboardInterrupt

    def inside_the_save(args, console):
        raise SaveInterrupted(tmp_path, saved=True)

    def just_after_the_swap(args, console):  # saved, but the interrupt struck before the command could say so
        args.out = str(tmp_path / "out")
        args.out_identity = cli.saved_identity(args.out)
        save_pruned(make_conv_net(), args.out)
        raise KeyboardInterrupt

    expected = [(before_saving, "interrupted: nothing was saved"),
                (just_after_the_swap, f"interrupted after saving: {tmp_path / 'out'} holds the complete new save"),
                (after_saving, f"interrupted after saving: {tmp_path} holds the complete new save"),
                (inside_the_save, f"the swap was finished first, {tmp_path} holds the new save")]
    for command, message in expected:
        monkeypatch.setattr(cli, "cmd_list", command)
        assert cli.main(["list"]) == 130
        assert message in capsys.readouterr().err


def test_hf_weights_must_match_the_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from subprune.hf.models import load_transformer

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    load_transformer(tmp_path)  # as saved: loads
    edited = json.loads((tmp_path / "config.json").read_text())
    for layers, kind in ((3, "missing"), (1, "unexpected")):
        (tmp_path / "config.json").write_text(json.dumps({**edited, "num_hidden_layers": layers}))
        with pytest.raises(ValueError, match=rf"do not match config.json: \d+ {kind} keys .*randomly initialised"):
            load_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**edited, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="cannot be loaded with its config.json|do not match config.json"):
        load_transformer(tmp_path)


def test_hf_saved_widths_are_checked_before_allocating(tmp_path):
    transformers = pytest.importorskip("transformers")
    from subprune.hf import load_pruned as hf_load
    from subprune.hf import save_pruned as hf_save

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    out = hf_save(transformers.BertModel(config), tmp_path / "p")
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "subprune_widths": [
        {"heads": 2, "kv_heads": 2, "ffn": 10**6}, saved["subprune_widths"][1]]}))
    with pytest.raises(ValueError, match=r"block 0 has ffn=1000000; it must lie in 1..32"):
        hf_load(out)
    (out / "config.json").write_text(json.dumps({**saved, "subprune_widths": [
        {"heads": 2, "kv_heads": 2, "ffn": 20}, saved["subprune_widths"][1]]}))
    with pytest.raises(ValueError, match=r"weights do not match config.json .* stored \[32, 16\], config gives "
                                         r"\[20, 16\]"):
        hf_load(out)
    (out / "config.json").write_text(json.dumps({**saved, "intermediate_size": 10**10}))  # 2.4 TB if allocated
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"describes a model of 2,4[0-9][0-9].[0-9] GB before pruning, more than the"):
        hf_load(out)
    assert time.perf_counter() - start < 20
    assert os.listdir(tmp_path) == ["p"]


@pytest.mark.parametrize("edit,match", [
    (lambda e: e["shapes"].update(weight=[10**9]),
     r"weight of shape \[1000000000\]; a pruned shape has 1 sizes, each in 1..\[8\]"),
    (lambda e: e["shapes"].update(weight=[4, 2]), r"weight of shape \[4, 2\]"),
    (lambda e: e["shapes"].update(extra=[1]), "has no tensor 'extra'"),
    (lambda e: e["attributes"].update(normalized_shape=[10**9]), r"normalized_shape=\[1000000000\]; a pruned"),
    (lambda e: e.update(type="Linear"), "is a LayerNorm in the model, the save has a 'Linear'"),
])
def test_saved_tensor_shapes_are_checked_before_allocating(tmp_path, edit, match):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    out = save_pruned(model, tmp_path / "p")
    spec = json.loads((out / "architecture.json").read_text())
    edit(spec["tensors"]["1"])
    (out / "architecture.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=match):
        load_pruned(out, model=model)
