"""The staged engine (subprune.staged) against the per-site driver, on real (small) CNNs.

The per-site driver runs the calibration set from the input to every site; the
staged engine runs the traced graph stage by stage from cached tensors. Both
must give the same statistics, hence the same kept channels and the same pruned
model, while the staged engine runs every module about twice for SeqInChange
and three times for AsymInChange (counted with forward pre-hooks).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_conv_net
from torch import nn

from subprune.models.cnn import ARCHITECTURES
from subprune.pipeline import PruneConfig, prune
from subprune.staged import counting_calls, dense_forward_equivalents

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def _both(model: nn.Module, x: torch.Tensor, **config):
    """Prune with the per-site driver and with the staged engine; return both results."""
    runs = [prune(model, x, PruneConfig(keep=0.5, progress=False, engine=e, **config)) for e in ("per-site", "staged")]
    return runs


def _assert_same(per_site, staged, x: torch.Tensor) -> None:
    assert [s.name for s in staged.sites] == [s.name for s in per_site.sites]
    assert [s.keep for s in staged.sites] == [s.keep for s in per_site.sites]
    for a, b in zip(per_site.sites, staged.sites, strict=True):
        assert a.objective == pytest.approx(b.objective, rel=1e-9, abs=1e-12)
    assert staged.joint_refits.keys() == per_site.joint_refits.keys()
    for name, f in per_site.joint_refits.items():
        assert staged.joint_refits[name] == pytest.approx(f, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        ya, yb = per_site.model(x), staged.model(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)


CASES = [("lenet", False), ("resnet50", True), ("efficientnet-se", False), ("efficientnet-se", True),
         ("densenet", False),  # consumers after a concatenation: joint refits from the staged inputs
         pytest.param("cifar-resnet20", True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", ["seq", "asym", "layer"])
@pytest.mark.parametrize(("arch", "coupled"), CASES)
def test_staged_equals_per_site(arch, coupled, method):
    if arch == "lenet":
        model, x = make_conv_net(), _images(48, 1, 14)
    else:
        model, x = ARCHITECTURES[arch](0), _images(24, 3, 16)
    per_site, staged = _both(model, x, method=method, coupled=coupled, batch_size=10)  # 3 batches, the last short
    _assert_same(per_site, staged, x[:8])
    if method == "layer":
        assert staged.engine == per_site.engine == "dense, one pass"
    else:
        assert staged.engine == "staged" and per_site.engine.startswith("per-site")
        assert staged.passes["dense" if method == "asym" else "pruned"] > 0


class InplaceResidual(nn.Module):
    """A stem whose output is cached across two sites and changed in place after the first cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(8, 10, 1), nn.Conv2d(10, 8, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.conv2(torch.relu(self.conv1(x)))
        x.relu_()  # the stem output, live at the first cut, changed in place
        h = h + x
        h = self.conv4(self.act(self.conv3(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["seq", "asym"])
def test_in_place_operations_do_not_corrupt_the_caches(method):
    torch.manual_seed(0)
    x = _images(20, 3, 8)
    per_site, staged = _both(InplaceResidual().eval(), x, method=method, batch_size=8)
    assert staged.engine == "staged"
    assert [s.name for s in staged.sites] == ["conv1", "conv3", "conv4"]
    _assert_same(per_site, staged, x)


class Normed(nn.Module):
    """Linear -> LayerNorm over the channels -> Linear: the norm's shape is a constant of the traced graph."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.norm(self.fc1(x)))))


class _Attention(nn.Module):
    """timm's Attention: qkv -> (B, N, 3, heads, head_dim) -> softmax(q k^T) v -> proj (the head count is a constant
    of the traced graph)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, then pre-norm blocks (attention heads, LayerNorm'd MLP).

    With ``coupled=True`` the residual stream is a site too: its cut slices every LayerNorm, the class token and
    the position embedding (constants and sizes of the traced graph).
    """

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 24, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.norms1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.attns = nn.ModuleList([_Attention(dim, heads) for _ in range(depth)])
        self.norms2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, hidden) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, dim)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1) + self.pos_embed
        for n1, attn, n2, fc1, fc2 in zip(self.norms1, self.attns, self.norms2, self.fc1, self.fc2, strict=True):
            h = h + attn(n1(h))
            h = h + fc2(F.gelu(fc1(n2(h))))
        return self.head(self.norm(h)[:, 0])


def test_a_cut_that_changes_a_graph_constant_is_retraced_not_sent_to_per_site():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    per_site, staged = _both(Normed().eval(), x, method="seq")
    assert staged.engine == "staged, retraced after 1 site"  # fc1's cut slices the norm: (16,) -> (8,)
    assert staged.passes["pruned"] > 0
    _assert_same(per_site, staged, x)


@pytest.mark.parametrize("method", ["seq", "asym"])
@pytest.mark.parametrize("coupled", [False, True])
def test_vit_heads_and_layer_norms_stay_staged(method, coupled):
    """Attention heads (a reshape's constant) and LayerNorm-sliced streams: the staged engine retraces after their
    cuts, keeps the per-site driver's units and outputs, and stays within its pass bound."""
    torch.manual_seed(0)
    model, x = TinyViT().eval(), _images(40, 3, 8)
    per_site, staged = _both(model, x, method=method, coupled=coupled, batch_size=16)  # 3 batches, the last short
    sites = {s.name: s for s in staged.sites}
    assert {"attns.0.qkv", "attns.1.qkv", "fc1.0", "fc1.1"} <= set(sites) and ("patch" in sites) == coupled
    assert staged.engine == f"staged, retraced after {3 if coupled else 2} sites"  # every heads site (+ the stream)
    assert per_site.engine == "per-site (engine='per-site')"
    assert staged.model.attns[0].num_heads == 2 and staged.model.norm.normalized_shape == ((8,) if coupled else (16,))
    _assert_same(per_site, staged, x)
    dense, _ = _passes(model, x, method=method, batch_size=16)
    per_site_passes, _ = _passes(model, x, method=method, batch_size=16, engine="per-site")
    # A coupled stream whose consumers span the whole network adds one run to its last consumer (module docstring).
    assert dense <= (2.0 if method == "seq" else 3.0) + coupled
    assert dense < per_site_passes


def test_a_retrace_that_changes_the_structure_is_refused_and_the_run_repeated_per_site(monkeypatch):
    from subprune.graph import trace
    from subprune.staged import RetraceMismatch, StagedGraph

    x = torch.randn(4, 6)
    graph = StagedGraph(trace(Normed().eval(), x), Normed())
    with pytest.raises(RetraceMismatch, match="nodes"):
        graph.adopt(trace(nn.Sequential(nn.Linear(6, 2)), x))
    # In a run: the pipeline repeats the prune with the per-site driver, with the same result.
    monkeypatch.setattr(StagedGraph, "adopt", lambda self, gm: (_ for _ in ()).throw(RetraceMismatch("test")))
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    per_site, staged = _both(Normed().eval(), x, method="seq")
    assert staged.engine == per_site.engine == "per-site (engine='per-site')"
    _assert_same(per_site, staged, x)


@pytest.mark.parametrize("method", ["seq", "asym"])
def test_the_last_site_changing_a_graph_constant_is_retraced_before_the_final_check(method):
    torch.manual_seed(0)
    model, x = TinyViT().eval(), _images(24, 3, 8)
    config = {"method": method, "batch_size": 8}
    runs = [prune(model, x, PruneConfig(keep={"attns.0.qkv": 0.5, "attns.1.qkv": 0.5}, progress=False, engine=e,
                                        **config)) for e in ("per-site", "staged")]
    assert [s.name for s in runs[1].sites] == ["attns.0.qkv", "attns.1.qkv"]
    assert runs[1].engine == "staged, retraced after 2 sites"  # not repeated per site by the final replay check
    _assert_same(*runs, x)


def _timm_model(name: str):
    from subprune.models.timm_import import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    if name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64).eval()
    kwargs = {"vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
              "convnext_atto": {"depths": (1, 1, 1, 1)}}[name]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def _timm_importable() -> bool:
    try:
        _timm_model("convnext_atto")
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _timm_importable(), reason="timm is not installed (make zoo-extras)")
@pytest.mark.parametrize(("name", "method", "retraced"), [
    pytest.param("vit_tiny_patch16_224", "seq", 3, marks=pytest.mark.slow),
    pytest.param("vit_tiny_patch16_224", "asym", 3, marks=pytest.mark.slow), ("mixer", "seq", 1),
    pytest.param("convnext_atto", "seq", 4, marks=pytest.mark.slow),
    pytest.param("convnext_atto", "asym", 4, marks=pytest.mark.slow)])
def test_timm_vit_mixer_convnext_stay_staged(name, method, retraced):
    """Issue 11: these fell back to the per-site driver (heads, LayerNorm shapes); now the same units, staged.

    (Mixer's coupled Asym is refused by both engines: its token MLP acts across the pruned dimension.)
    """
    model, x = _timm_model(name), _images(16, 3, 32)
    per_site, staged = _both(model, x, method=method, coupled=True, batch_size=8)
    assert staged.engine == f"staged, retraced after {retraced} site{'s' if retraced > 1 else ''}"
    _assert_same(per_site, staged, x[:4])
    dense, _ = _passes(model, x, method=method, batch_size=8)
    assert dense <= (2.0 if method == "seq" else 3.0) + 1  # + the coupled stream's run to its last consumer


def _passes(model: nn.Module, x: torch.Tensor, **config) -> tuple[float, object]:
    """Dense-forward equivalents of the calibration batches (the 2-sample trace and check runs left out)."""
    with counting_calls(min_batch=3) as dense, torch.no_grad():
        model(x)
    with counting_calls(min_batch=3) as counts:
        result = prune(model, x, PruneConfig(keep=0.5, progress=False, **config))
    return dense_forward_equivalents(counts, dense), result


def _chain(depth: int = 9) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(12, 24), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(24, 24), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(24, 3)).eval()


@pytest.mark.parametrize(("method", "bound"), [("layer", 1.0), ("seq", 2.0), ("asym", 3.0)])
def test_module_executions_are_bounded(method, bound):
    model, x = _chain(), torch.randn(80, 12, generator=torch.Generator().manual_seed(0))  # 8 sites in a chain
    staged, result = _passes(model, x, method=method, batch_size=32)
    per_site, _ = _passes(model, x, method=method, batch_size=32, engine="per-site")
    assert staged <= bound
    assert result.engine == ("dense, one pass" if method == "layer" else "staged")
    if method == "layer":
        assert per_site == staged
    else:  # the per-site driver re-runs the early layers for every site: about (sites + 1) / 2 passes a stream
        assert per_site >= (4.0 if method == "seq" else 8.0)
        assert sum(result.passes.values()) <= bound


def test_offload_and_a_ragged_last_batch_give_the_same_result():
    model, x = ARCHITECTURES["efficientnet-se"](0), _images(21, 3, 16)
    per_site, staged = _both(model, x, method="asym", batch_size=8, offload=True, device="cpu")
    assert staged.engine == "staged"
    _assert_same(per_site, staged, x[:8])


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="engine.*staged.*per-site"):
        PruneConfig(engine="fast")


def test_joint_refits_read_cached_inputs():
    """DenseNet: consumers after concatenations are refit jointly; Layer reads them from its one dense pass."""
    model, x = ARCHITECTURES["densenet"](0), _images(24, 3, 16)
    passes, result = _passes(model, x, method="layer", batch_size=8)
    assert result.joint_refits and passes == pytest.approx(1.0)
    per_site, _ = _passes(model, x, method="asym", batch_size=8, engine="per-site")
    staged, result = _passes(model, x, method="asym", batch_size=8)
    assert result.joint_refits and staged < per_site / 2
