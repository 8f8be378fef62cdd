"""Calibration in any form: Tensors, ndarrays, Datasets, DataLoaders, lists, multi-input batches."""

import numpy as np
import pytest
import torch
from conftest import make_conv_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from subprune import PruneConfig, prune
from subprune.calibration import as_calibration
from subprune.sites import TraceError

CONFIG = PruneConfig(method="asym", keep=0.5, progress=False, batch_size=32)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def reference():
    """The pruned model from a plain Tensor: every other form must give exactly this."""
    images = torch.randn(96, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    return images, _weights(prune(make_conv_net(), images, CONFIG).model)


@pytest.mark.parametrize("form", ["ndarray", "tensordataset", "dataloader", "dataloader_xy", "list", "iterator"])
def test_every_form_gives_the_tensor_result(reference, form):
    images, expected = reference
    labels = torch.arange(96) % 4
    data = {
        "ndarray": images.numpy().astype(np.float64),  # NumPy's float64 is cast to the model's float32
        "tensordataset": TensorDataset(images),
        "dataloader": DataLoader(TensorDataset(images), batch_size=20),
        "dataloader_xy": DataLoader(TensorDataset(images, labels), batch_size=20),  # (inputs, labels) batches
        "list": [images[i : i + 40] for i in range(0, 96, 40)],
        "iterator": iter([images[:50], images[50:]]),
    }[form]
    _assert_same_weights(_weights(prune(make_conv_net(), data, CONFIG).model), expected)


def test_labels_come_from_the_batches():
    images = torch.randn(64, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(3))
    config = PruneConfig(method="layer-actgrad", keep=0.5, progress=False, batch_size=16)
    given = _weights(prune(make_conv_net(), images, config, labels=labels).model)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    _assert_same_weights(_weights(prune(make_conv_net(), loader, config).model), given)
    with pytest.raises(ValueError, match="needs labelled calibration data"):
        prune(make_conv_net(), images, config)
    cal = as_calibration([{"x": images[:32], "label": labels[:32]}, {"x": images[32:], "label": labels[32:]}])
    assert torch.equal(cal.labels, labels)


class TwoInputs(nn.Module):
    """forward(x, mask): features gated by a per-sample mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x, mask):
        h = torch.relu(self.fc1(x)) * mask
        return self.head(torch.relu(self.fc2(h)))


class OptionalMask(TwoInputs):
    def forward(self, x, mask=None):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.head(torch.relu(self.fc2(h)))


def _two_input_data(n=80):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 6, generator=g), (torch.rand(n, 16, generator=g) > 0.3).float()


def test_two_input_model_from_tuples_and_dicts():
    x, mask = _two_input_data()
    model = TwoInputs().eval()
    tuples = prune(model, [(x[:40], mask[:40]), (x[40:], mask[40:])], CONFIG).model
    dicts = prune(model, DataLoader([{"x": a, "mask": m} for a, m in zip(x, mask, strict=True)], batch_size=16),
                  CONFIG).model
    _assert_same_weights(_weights(tuples), _weights(dicts))
    # fc1's channels meet the mask (another input): not prunable; fc2 is
    assert tuples.fc1.out_features == 16 and tuples.fc2.out_features == 6
    assert tuples(x, mask).shape == (80, 3)
    # keep 1: the refit reproduces the dense outputs on the calibration inputs
    full = prune(model, (x, mask), PruneConfig(keep=1.0, progress=False)).model
    torch.testing.assert_close(full(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)


def test_two_input_model_with_one_tensor_names_the_fix():
    x, _ = _two_input_data()
    with pytest.raises(TypeError, match=r"pass batches as tuples \(x, mask\).*dicts"):
        prune(TwoInputs().eval(), x, CONFIG)


def test_optional_mask_is_traced_without_it_or_with_it():
    x, mask = _two_input_data()
    model = OptionalMask().eval()
    pruned = prune(model, x, CONFIG).model  # mask=None: its branch is not traced (no ShapeProp error)
    assert pruned.fc1.out_features == 8 and pruned(x).shape == (80, 3)
    masked = prune(model, (x, mask), CONFIG).model  # with the mask: fc1's channels meet it, fc2 is pruned
    assert masked.fc1.out_features == 16 and masked.fc2.out_features == 6
    assert masked(x, mask).shape == (80, 3)
    explicit = prune(model, x, CONFIG, concrete_args={"mask": None}).model  # what the automatic choice does
    _assert_same_weights(_weights(explicit), _weights(pruned))


def test_data_dependent_control_flow_names_concrete_args():
    class Branchy(OptionalMask):
        def forward(self, x, mask=None):
            h = torch.relu(self.fc1(x))
            if (h > 0).any():
                h = h * 2
            return self.head(torch.relu(self.fc2(h)))

    x, _ = _two_input_data()
    with pytest.raises(TraceError, match="concrete_args"):
        prune(Branchy().eval(), x, CONFIG)


def test_torchscript_and_compile_are_refused_with_the_fix(images):
    model = make_conv_net()
    with pytest.raises(TypeError, match="pass the original nn.Module"):
        prune(torch.jit.script(model), images, CONFIG)
    with pytest.raises(TypeError, match=r"pass the original nn.Module \(model._orig_mod\)"):
        prune(torch.compile(model), images, CONFIG)


def test_float64_and_frozen_parameters_survive(images):
    model = make_conv_net().double()
    model.conv1.weight.requires_grad_(False)
    model.fc1.requires_grad_(False)
    pruned = prune(model, images.double(), CONFIG).model
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}
    frozen = {n for n, p in pruned.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "fc1.weight", "fc1.bias"}
    assert pruned.fc1.in_features < 72


def test_ragged_batches_are_streamed_as_given():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 12, 12, generator=g), torch.randn(8, 3, 16, 16, generator=g)]
    cal = as_calibration(batches)
    assert not cal.stored and len(cal) == 16 and cal.n_batches(4) == 2
    pruned = prune(Pooled().eval(), batches, CONFIG).model
    assert pruned.conv.out_channels == 4 and pruned.fc.in_features == 4


def test_bad_forms_are_named():
    with pytest.raises(TypeError, match="DataLoader"):
        as_calibration(3.0)
    with pytest.raises(TypeError, match="load_inputs"):
        as_calibration("images/")
    with pytest.raises(ValueError, match="no batch"):
        as_calibration([])
    with pytest.raises(TraceError, match="samples of shape"):
        prune(make_conv_net(), torch.randn(8, 3, 14, 14), CONFIG)
