"""Device option, layer-by-layer offloading, peak memory and mixed-precision statistics."""

import dataclasses

import pytest
import torch
from conftest import make_conv_net
from torch import nn

from subprune.devices import MemoryTracker, offload_modules, resolve_device
from subprune.pipeline import PruneConfig, prune
from subprune.statistics import MIXED_BLOCK_ROWS, GramStatistics

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
U32 = 2.0**-24  # unit roundoff of float32


def _config(**extra) -> PruneConfig:
    return PruneConfig(method="asym", keep=0.5, batch_size=32, progress=False, **extra)


def _same_result(a, b, rtol=1e-6, atol=1e-7) -> None:
    assert [s.keep for s in a.sites] == [s.keep for s in b.sites]
    expected = b.model.state_dict()
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor.cpu(), expected[name].cpu(), rtol=rtol, atol=atol)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_offload_gives_identical_results_and_leaves_no_hooks(images):
    model = make_conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = prune(model, images, _config())
    offloaded = prune(model, images, _config(offload=True, device="cpu"))
    _same_result(offloaded, plain, rtol=0, atol=0)
    assert _no_hooks(model) and _no_hooks(offloaded.model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # user's model untouched


def test_offload_context_removes_its_hooks_even_on_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    expected = model(x)
    with offload_modules([model], torch.device("cpu")):
        assert model[0]._forward_pre_hooks and model[2]._forward_hooks
        assert not model[1]._forward_pre_hooks  # no weights of its own: nothing to move
        torch.testing.assert_close(model(x), expected)
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), offload_modules([model], torch.device("cpu")):
        raise RuntimeError("boom")
    assert _no_hooks(model)


def test_offload_moves_one_module_at_a_time_and_puts_the_host_weights_back(conv_net, images):
    """The meta device stands in for an accelerator: weights visibly leave the CPU only while their module runs."""
    meta = torch.device("meta")
    host = {name: p for name, p in conv_net.named_parameters()}
    seen = {}

    def spy(name):
        def hook(module, args):
            seen[name] = [tuple(sorted(n for n, p in conv_net.named_parameters() if p.device.type == "meta"))]
            seen[name + ".own"] = module.weight.device.type
        return hook

    with offload_modules([conv_net], meta):
        handles = [conv_net.get_submodule(n).register_forward_pre_hook(spy(n)) for n in ("conv2", "fc1")]
        try:
            out = conv_net(images[:4].to(meta))
        finally:
            for h in handles:
                h.remove()
    assert out.device == meta and out.shape == (4, 4)
    # Each module ran with its own weights on the device (the spy runs after the offload hook of the same
    # module) and only its own: the modules before it had put their host weights back.
    assert seen["conv2.own"] == seen["fc1.own"] == "meta"
    assert seen["conv2"] == [("conv2.bias", "conv2.weight")] and seen["fc1"] == [("fc1.bias", "fc1.weight")]
    assert all(p.device.type == "cpu" for p in conv_net.parameters())
    for name, p in conv_net.named_parameters():  # the same Parameter objects are back
        assert p is host[name]


def test_offload_of_a_model_with_its_own_parameter_moves_only_that_parameter():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) * self.scale

    model = Scaled()
    devices = {}
    with offload_modules([model], torch.device("meta")):
        spy = model.b.register_forward_pre_hook(
            lambda m, args: devices.update(b=m.weight.device.type, a=model.a.weight.device.type,
                                           scale=model.scale.device.type))
        assert model(torch.randn(4, 3, device="meta")).device.type == "meta"
        spy.remove()
    assert devices == {"b": "meta", "a": "cpu", "scale": "meta"}  # not the whole model at once
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_peak_memory_is_reported(images):
    result = prune(make_conv_net(), images, _config())
    assert result.memory.device == "cpu"
    assert result.memory.peak_bytes > 10 * 2**20  # the process holds at least torch itself
    with MemoryTracker(torch.device("cpu")) as tracker:
        block = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
        block += 1
    assert tracker.result.peak_bytes >= 64 * 2**20


def test_bad_device_and_precision_are_refused(images):
    with pytest.raises(ValueError, match="not a torch device"):
        prune(make_conv_net(), images, _config(device="gpu0"))
    with pytest.raises(ValueError, match="precision"):
        _config(precision="half")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            prune(make_conv_net(), images, _config(device="cuda"))
    assert resolve_device(None, make_conv_net()) == torch.device("cpu")


def _relu_features(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    """Post-ReLU features of a random two-layer net on inputs with a mean offset: (rows, d), float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=gen) + 0.5
    h = torch.relu(x @ torch.randn(64, 128, generator=gen) / 8)
    return torch.relu(h @ torch.randn(128, d, generator=gen) / 11 + 0.1)


def test_mixed_precision_gram_meets_its_error_bound():
    b = _relu_features(3 * MIXED_BLOCK_ROWS + 123, 96)  # several float32 blocks
    exact, mixed = GramStatistics(96), GramStatistics(96, precision="mixed")
    for chunk in b.split(5000):
        exact.update(chunk.double())
        mixed.update(chunk.double())
    error = (mixed.gram_ - exact.gram_).abs()
    # Entrywise bound for blocks of r rows: |dG| <= r u |B|^T |B| (= r u G for non-negative B).
    assert bool((error <= MIXED_BLOCK_ROWS * U32 * exact.gram_.abs() + 1e-30).all())
    relative = float(torch.linalg.matrix_norm(mixed.gram_ - exact.gram_) / torch.linalg.matrix_norm(exact.gram_))
    assert 0 < relative < 10 * MIXED_BLOCK_ROWS**0.5 * U32  # typical: near sqrt(r) u, far below r u
    assert mixed.n_rows_ == exact.n_rows_ == b.shape[0]


def test_mixed_precision_pruning_selects_the_same_channels(images):
    exact = prune(make_conv_net(), images, _config())
    mixed = prune(make_conv_net(), images, _config(precision="mixed"))
    assert [s.keep for s in mixed.sites] == [s.keep for s in exact.sites]
    for m, e in zip(mixed.sites, exact.sites, strict=True):
        assert m.objective == pytest.approx(e.objective, abs=1e-5)
    _same_result(mixed, exact, rtol=1e-3, atol=1e-4)


@CUDA
@pytest.mark.parametrize("method", ["layer", "asym"])
def test_cuda_prunes_like_the_cpu(images, method):
    cpu = prune(make_conv_net(), images, _config(method=method))
    gpu = prune(make_conv_net(), images, _config(method=method, device="cuda"))
    assert next(gpu.model.parameters()).is_cuda
    assert gpu.memory.device.startswith("cuda") and gpu.memory.peak_bytes > 0
    _same_result(gpu, cpu, rtol=1e-4, atol=1e-5)


@CUDA
def test_cuda_offload_keeps_device_memory_below_the_model():
    torch.manual_seed(0)
    width, depth = 1024, 32
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).eval()
    calibration = torch.randn(256, width)
    config = PruneConfig(method="seq", keep=0.25, batch_size=64, progress=False, device="cuda")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = prune(model, calibration, dataclasses.replace(config, offload=True))
    resident = prune(model, calibration, config)
    assert not next(offloaded.model.parameters()).is_cuda  # the working copy stayed in host memory
    assert offloaded.memory.peak_bytes < 0.5 * model_bytes < resident.memory.peak_bytes
    assert [s.keep for s in offloaded.sites] == [s.keep for s in resident.sites]


@CUDA
def test_cuda_mixed_precision_gram_meets_its_error_bound():
    b = _relu_features(2 * MIXED_BLOCK_ROWS, 256).cuda()
    exact = GramStatistics(256, device="cuda")
    mixed = GramStatistics(256, device="cuda", precision="mixed")
    exact.update(b.double())
    mixed.update(b)
    relative = float(torch.linalg.matrix_norm(mixed.gram_ - exact.gram_) / torch.linalg.matrix_norm(exact.gram_))
    assert relative < MIXED_BLOCK_ROWS * U32
