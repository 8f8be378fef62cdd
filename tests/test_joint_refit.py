"""A consumer that several sites feed (a concatenation) is refit once on all its kept columns.

The reference is a direct least-squares solve (torch.linalg.lstsq) on the captured,
unfolded input of the Inception mixing conv, which reads three branches.
"""

import pytest
import torch
import torch.nn.functional as F

from subprune.joint_refit import shared_consumers
from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import PruneConfig, prune
from subprune.sites import find_sites

OFFSETS = {"b1": 0, "b2b": 8, "b3": 24}  # where each branch's channels lie in the input of "mix"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model = ARCHITECTURES["inception"](0)
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, x


def _mix_rows(model, x):
    """Rows of B for the 3x3 conv "mix": its input unfolded, shape (N * 256, C * 9), float64."""
    store = {}
    handle = model.mix.register_forward_pre_hook(lambda m, a: store.setdefault("x", a[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    cols = F.unfold(store["x"].double(), 3, padding=1)  # (N, C 9, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _weight(model):
    return model.mix.weight.detach().double().reshape(model.mix.weight.shape[0], -1).T  # (C 9, m)


def _lstsq(b, target):
    return torch.linalg.lstsq(b, target, driver="gelsd").solution


def test_shared_consumers(setup):
    model, x = setup
    sites, _ = find_sites(model, x[:2])
    assert shared_consumers(sites) == {"mix": ["b1", "b2b", "b3"]}


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_joint_refit_is_least_squares_on_the_concatenated_input(method, setup):
    model, x = setup
    config = PruneConfig(method=method, keep=0.5, layers=("b1", "b2b", "b3"), progress=False)
    result = prune(model, x, config)
    kept = torch.tensor(sorted(OFFSETS[r.name] + c for r in result.sites for c in r.keep))
    cols = (kept.unsqueeze(1) * 9 + torch.arange(9)).reshape(-1)
    b = _mix_rows(model, x)  # upstream is not pruned: the kept columns are the dense ones
    expected = _lstsq(b[:, cols], b @ _weight(model))
    torch.testing.assert_close(_weight(result.model), expected, atol=2e-5, rtol=1e-4)
    assert 0.5 < result.joint_refits["mix"] < 1


def test_asym_targets_the_dense_model_and_seq_the_model_before_the_group(setup):
    model, x = setup
    result = prune(model, x, PruneConfig(method="asym", keep=0.5, progress=False))
    mix_keep = next(r.keep for r in result.sites if r.name == "mix")  # the mix rows kept by its own site
    target = _mix_rows(model, x) @ _weight(model)[:, mix_keep]
    expected = _lstsq(_mix_rows(result.model, x), target)
    torch.testing.assert_close(_weight(result.model), expected, atol=2e-5, rtol=1e-4)

    layers = ("stem.0", "b1", "b2b", "b3")
    result = prune(model, x, PruneConfig(method="seq", keep=0.5, layers=layers, progress=False))
    before = prune(model, x, PruneConfig(method="seq", keep=0.5, layers=layers[:1], progress=False)).model
    expected = _lstsq(_mix_rows(result.model, x), _mix_rows(before, x) @ _weight(before))
    torch.testing.assert_close(_weight(result.model), expected, atol=2e-5, rtol=1e-4)


def test_no_joint_refit_without_reweighting_or_pruning(setup):
    model, x = setup
    assert prune(model, x, PruneConfig(method="layer", keep=0.5, reweight=False, progress=False)).joint_refits == {}
    full = prune(model, x, PruneConfig(method="seq", keep=1.0, progress=False))
    assert full.joint_refits == {}
    torch.testing.assert_close(full.model.mix.weight, model.mix.weight)


class _ReadsAndWrites(torch.nn.Module):
    """A conv that reads the residual stream and a branch (concatenated) and writes the stream."""

    def __init__(self):
        super().__init__()
        self.q, self.p = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
        self.c, self.head = torch.nn.Conv2d(12, 8, 3, padding=1), torch.nn.Linear(8, 2)

    def forward(self, x):
        s = torch.relu(self.q(x))
        s = s + self.c(torch.cat([s, torch.relu(self.p(s))], 1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(s, 1), 1))


@pytest.mark.parametrize("method", ["layer", "seq", "asym"])
def test_joint_refit_of_a_consumer_whose_outputs_were_cut_first(method):
    torch.manual_seed(0)
    model, x = _ReadsAndWrites().eval(), torch.randn(16, 3, 8, 8)
    sites, _ = find_sites(model, x[:2], coupled=True)
    assert [s.name for s in sites] == ["q", "p"] and shared_consumers(sites) == {"c": ["q", "p"]}
    result = prune(model, x, PruneConfig(method=method, keep=0.5, coupled=True, progress=False))
    stream, branch = (r.keep for r in result.sites)  # c's output rows are the stream's kept channels
    kept = torch.tensor(stream + [8 + c for c in branch])
    cols = (kept.unsqueeze(1) * 9 + torch.arange(9)).reshape(-1)

    def rows(m):
        store = {}
        handle = m.c.register_forward_pre_hook(lambda mod, a: store.setdefault("x", a[0].detach()))
        with torch.no_grad():
            m(x)
        handle.remove()
        unfolded = F.unfold(store["x"].double(), 3, padding=1)  # (N, C 9, L)
        return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])

    dense = rows(model)
    b = dense[:, cols] if method == "layer" else rows(result.model)
    expected = _lstsq(b, dense @ model.c.weight.detach().double().reshape(8, -1).T[:, stream])
    got = result.model.c.weight.detach().double().reshape(len(stream), -1).T
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
