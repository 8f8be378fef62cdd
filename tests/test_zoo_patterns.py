"""Graph patterns of timm/torchvision-style models, each on a small definition (issue 15).

For every pattern: the sites found, the cut model equals the dense model with
the removed channels' consumer columns zeroed (where no LayerNorm over the
channels is renormalised), the cut with every index kept reproduces the dense
output, the parameter count predicted by ParameterCounter is exact, and the
pipeline's refit runs on it.
"""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subprune.budgets import ParameterCounter
from subprune.pipeline import PruneConfig, prune
from subprune.sites import NothingToPruneError, TraceError, find_sites
from subprune.statistics import consumer_input_rows
from subprune.surgery import consumer_weight_matrix, prune_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _masked(model, sites, keep):
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for site in sites:
            dropped = sorted(set(range(site.channels)) - set(keep[site.name].tolist()))
            for ref in site.consumers:
                w = consumer_weight_matrix(masked.get_submodule(ref.module))
                width = ref.span // site.channels
                for unit in dropped:
                    w[(ref.start + unit * width) * ref.kernel : (ref.start + (unit + 1) * width) * ref.kernel] = 0
    return masked


def check(model, x, coupled=False, expect=None, method="asym"):
    """The common assertions; returns the sites."""
    model.eval()
    sites, skipped = find_sites(model, x[:2], coupled=coupled)
    if expect is not None:
        assert sorted(s.name for s in sites) == sorted(expect), (sites, skipped)
    keep = {s.name: torch.arange(0, s.channels, 2) for s in sites}  # every other unit
    with torch.no_grad():
        dense = model(x)
        full = prune_model(model, sites, {s.name: torch.arange(s.channels) for s in sites})
        torch.testing.assert_close(full(x), dense)
        cut = prune_model(model, sites, keep)
        out = cut(x)
        assert out.shape == dense.shape
        plain = [s for s in sites if not s.renormalised]
        if len(plain) == len(sites):
            torch.testing.assert_close(out, _masked(model, sites, keep)(x), atol=1e-5, rtol=1e-5)
    counter = ParameterCounter(model, sites)
    assert counter.count({s.name: len(keep[s.name]) for s in sites}) == _params(cut)
    assert counter.count({}) == _params(model)
    result = prune(model, x, PruneConfig(method=method, keep=0.5, coupled=coupled, progress=False))
    assert all(0 <= r.objective <= 1 + 1e-9 for r in result.sites)
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()
    return sites, skipped


def test_size_reads_and_view_flatten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 4)

        def forward(self, x):
            assert x.dim() == 4
            h = torch.relu(self.conv(x))
            h = h.view(h.size(0), -1)  # shape read, not data
            return self.head(torch.relu(self.fc(h[..., :])))

    sites, _ = check(Net(), torch.randn(32, 3, 8, 8), expect=["conv", "fc"])
    assert sites[0].consumers[0].kernel == 36


def test_functional_batch_norm_with_activation_module_matched_by_behaviour():
    class BatchNormAct2d(nn.BatchNorm2d):  # timm's: F.batch_norm, then its own activation, with a shape check
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            torch._assert(x.ndim == 4, "expected 4D input")
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
            return self.act(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.bn(self.a(x))).mean((2, 3))

    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.weight.uniform_(0.5, 2)
    sites, _ = check(model, torch.randn(16, 3, 6, 6), expect=["a"])
    assert {p.name for p in sites[0].parameters} == {"bn.running_mean", "bn.running_var", "bn.weight", "bn.bias"}
    cut = prune_model(model, sites, {"a": torch.tensor([1, 5])})
    assert cut.bn.num_features == 2 and cut.bn.weight.shape == (2,)


def test_channel_split_and_slices():
    class CSP(nn.Module):  # timm's CrossStage split by a size, a slice to the end, a slice with a fixed bound
        def __init__(self):
            super().__init__()
            self.stem, self.mid = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.wide, self.narrow, self.out = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3 + 4 + 4 + 2, 5, 1)

        def forward(self, x):
            a, b = torch.relu(self.stem(x)).split(3, dim=1)  # parts 0..2 (fixed size) and 3..5 (the rest)
            w = torch.relu(self.wide(x))[:, 2:]  # from a fixed start to the end
            n = torch.relu(self.narrow(x))[:, :2]  # up to a fixed bound
            return self.out(torch.cat([a, torch.relu(self.mid(b)), w, n], dim=1)).mean((2, 3))

    x = torch.randn(16, 3, 6, 6)
    sites, skipped = check(CSP(), x, expect=["stem[3:6]", "mid", "wide[2:6]"])
    by, reasons = {s.name: s for s in sites}, {s.name: s.reason for s in skipped}
    assert [(c.module, c.start, c.span) for c in by["stem[3:6]"].consumers] == [("mid", 0, 3)]
    assert [(c.module, c.start, c.span) for c in by["wide[2:6]"].consumers] == [("out", 7, 4)]
    assert "fixed in forward()" in reasons["stem[0:3]"] and "fixed in forward()" in reasons["narrow[0:2]"]
    assert reasons["wide[0:2]"] == "its channels reach no Linear/Conv2d that could be refit"


@pytest.mark.parametrize("first", [False, True])
def test_res2net_pass_through_part_read_as_spx_minus_one(first):
    class Bottle2neck(nn.Module):  # timm's Res2Net block: split(x, width), hierarchical adds, spx[-1] passed through
        def __init__(self, width=4, scale=4):
            super().__init__()
            self.width = width
            self.conv1 = nn.Conv2d(3, width * scale, 1)
            self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
            self.pool = nn.AvgPool2d(3, stride=1, padding=1) if first else None
            self.conv3, self.head = nn.Conv2d(width * scale, 5, 1), nn.Linear(5, 2)

        def forward(self, x):
            spx = torch.split(torch.relu(self.conv1(x)), self.width, 1)
            spo, sp = [], spx[0]
            for i, conv in enumerate(self.convs):
                sp = spx[i] if i == 0 or first else sp + spx[i]
                sp = torch.relu(conv(sp))
                spo.append(sp)
            spo.append(self.pool(spx[-1]) if first else spx[-1])
            return self.head(torch.relu(self.conv3(torch.cat(spo, 1))).mean((2, 3)))

    # the last part (read as spx[-1]) runs to the last channel: split(x, width) keeps the earlier bounds
    expect = ["conv1[12:16]", "convs.2", "conv3"] + (["convs.0", "convs.1"] if first else [])
    sites, skipped = check(Bottle2neck(), torch.randn(16, 3, 6, 6), expect=expect)
    reasons = {s.name: s.reason for s in skipped}
    assert all("fixed in forward()" in reasons[f"conv1[{a}:{a + 4}]"] for a in (0, 4, 8))
    if not first:  # convs.0's output is added to spx[1], a part of fixed size
        assert "fixed in forward()" in reasons["convs.0"] and "fixed in forward()" in reasons["convs.1"]
    part = next(s for s in sites if s.name == "conv1[12:16]")
    assert [(c.module, c.start, c.span) for c in part.consumers] == [("conv3", 12, 4)]
    cut = prune_model(Bottle2neck(), sites, {"conv1[12:16]": torch.tensor([1, 3])})
    assert cut.conv1.out_channels == 14 and cut.conv3.in_channels == 14


@pytest.mark.parametrize("resize", ["upsample-nearest", "upsample-bilinear", "interpolate", "zeropad", "constpad"])
def test_spatial_resizing_and_padding_modules(resize):
    layer = {
        "upsample-nearest": nn.Upsample(scale_factor=2, mode="nearest"),
        "upsample-bilinear": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        "interpolate": None, "zeropad": nn.ZeroPad2d((1, 0, 2, 1)), "constpad": nn.ConstantPad2d(1, 0.5),
    }[resize]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.resize = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3), layer

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = F.interpolate(h, size=(9, 9), mode="bilinear") if self.resize is None else self.resize(h)
            return self.b(h).flatten(1).mean(1, keepdim=True)

    check(Net(), torch.randn(16, 3, 6, 6), expect=["a"])


def test_group_norm_whole_groups_and_layer_norm_over_channels():
    class LayerNorm2d(nn.LayerNorm):  # timm's: channels-last LayerNorm of an NCHW tensor
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
            self.b, self.ln = nn.Conv2d(8, 6, 3, padding=1), LayerNorm2d(6)
            self.c, self.gn1 = nn.Conv2d(6, 6, 1), nn.GroupNorm(1, 6)
            self.d = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            h = self.b(torch.relu(self.gn(self.a(x))))
            h = self.c(torch.relu(self.ln(h)))
            return self.d(torch.relu(self.gn1(h))).mean((2, 3))

    model = Net()
    sites, _ = find_sites(model.eval(), torch.randn(2, 3, 6, 6))
    by = {s.name: s for s in sites}
    assert by["a"].channels == 4 and by["a"].group_size == 2 * 9  # whole groups of 2 channels
    assert not by["a"].renormalised and by["b"].renormalised == ("ln",) and by["c"].renormalised == ("gn1",)
    x = torch.randn(24, 3, 6, 6)
    check(model, x)
    cut = prune_model(model, sites, {"a": torch.tensor([0, 3]), "b": torch.tensor([1, 2, 4])})
    assert (cut.gn.num_groups, cut.gn.num_channels, cut.ln.normalized_shape, cut.ln.weight.shape) == (2, 4, (3,), (3,))
    # Whole groups: the GroupNorm of the kept groups is unchanged, so the cut equals the masked model.
    only_a = [by["a"]]
    keep = {"a": torch.tensor([0, 3])}
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model, only_a, keep)(x), _masked(model, only_a, keep)(x))


def test_token_mlps_mixer_token_mixing_and_mean_over_tokens():
    class Mixer(nn.Module):
        def __init__(self, tokens=5, dim=8):
            super().__init__()
            self.embed = nn.Linear(3, dim)
            self.norm = nn.LayerNorm(dim)
            self.tok1, self.tok2 = nn.Linear(tokens, 7), nn.Linear(7, tokens)  # act on the token dimension
            self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
            self.head = nn.Linear(dim, 2)

        def forward(self, x):  # x: (N, T, 3)
            h = self.embed(x)
            h = h + self.tok2(F.gelu(self.tok1(self.norm(h).transpose(1, 2)))).transpose(1, 2)
            h = h + self.fc2(F.gelu(self.fc1(h)))
            return self.head(h.mean(dim=1))  # a mean over tokens keeps the channels

    x = torch.randn(40, 5, 3)
    sites, skipped = check(Mixer(), x, expect=["tok1", "fc1"])
    assert {s.name: s.reason for s in skipped}["embed"].endswith("prune them together with coupled=True")
    sites, _ = check(Mixer(), x, coupled=True, expect=["embed", "tok1", "fc1"], method="seq")
    stream = sites[0]
    assert [p.module for p in stream.producers] == ["embed", "fc2"]
    assert [c.module for c in stream.consumers] == ["fc1", "head"]
    assert {p.name for p in stream.parameters} == {"norm.weight", "norm.bias"} and stream.renormalised == ("norm",)
    with pytest.raises(ValueError, match="consumer 'tok2' reads a tensor whose other dimensions hold pruned channels"):
        prune(Mixer(), x, PruneConfig(method="asym", coupled=True, progress=False))


class _TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, LayerScale, MLP; attention kept out."""

    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 10, dim))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)  # (N, 9, dim)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], dim=1) + self.pos_embed
        h = h + self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h[:, 0])


def test_vit_stream_with_class_token_position_embedding_and_layer_scale():
    x = torch.randn(30, 3, 6, 6)
    sites, _ = check(_TinyViT(), x, coupled=True, expect=["patch", "fc1"])
    stream = sites[0]
    assert {p.name: p.axis for p in stream.parameters} == {
        "cls_token": 2, "pos_embed": 2, "norm.weight": 0, "norm.bias": 0, "gamma": 0}
    cut = prune_model(_TinyViT(), sites, {"patch": torch.tensor([0, 2, 5]), "fc1": torch.arange(4)})
    assert (cut.cls_token.shape, cut.pos_embed.shape, cut.gamma.shape, cut.head.in_features) == (
        (1, 1, 3), (1, 10, 3), (3,), 3)


def test_tied_parameters_are_reported_not_untied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.c.weight = self.b.weight

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(torch.relu(self.c(torch.relu(self.b(h)))))

    sites, skipped = find_sites(Tied(), torch.randn(2, 4))
    reasons = {s.name: s.reason for s in skipped}
    assert "'c.weight' is tied to 'b.weight'" in reasons["a"] or "'b.weight' is tied to 'c.weight'" in reasons["a"]
    assert "tied" in reasons["b"] and "tied" in reasons["c"] and not sites


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size (timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pads = []
        for i, k, s in ((ih, self.kernel_size[0], self.stride[0]), (iw, self.kernel_size[1], self.stride[1])):
            total = max((-(-i // s) - 1) * s + k - i, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, (*pads[1], *pads[0]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclass_with_same_padding_is_the_conv_it_is():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv2dSame(3, 6, 3, stride=2), Conv2dSame(6, 5, 3, stride=2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean((2, 3))

    model, x = Net(), torch.randn(20, 3, 7, 7)
    check(model, x, expect=["a"])
    h = torch.relu(model.a(x))  # the statistics unfold exactly the patches the layer convolves
    rows = torch.cat(list(consumer_input_rows(model.b, h)))
    direct = model.b(h) - model.b.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(rows @ consumer_weight_matrix(model.b).double(),
                               direct.permute(0, 2, 3, 1).reshape(-1, 5).double(), atol=1e-5, rtol=1e-5)
    cut = prune_model(model, find_sites(model, x[:2])[0], {"a": torch.tensor([1, 4])})
    assert type(cut.a) is Conv2dSame and type(cut.b) is Conv2dSame and cut.b.in_channels == 2

    class Standardised(nn.Conv2d):  # computes something else than a convolution of its input with its weight
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / 2
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    model.b = Standardised(6, 5, 3)
    _, skipped = find_sites(model, x[:2])
    assert "neither a plain nor a 'SAME'-padded convolution" in {s.name: s.reason for s in skipped}["a"]


def test_shape_checks_traced_with_concrete_shapes_and_value_branches_named():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3), nn.Linear(6, 2)

        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError("expected RGB")
            n, c, h, w = x.shape
            return self.b(torch.relu(self.a(x)).mean((2, 3)).reshape(n, -1))

    check(Checked(), torch.randn(16, 3, 5, 5), expect=["a"])

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b, self.c = nn.Linear(4, 6), Gate(), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.gate(torch.relu(self.a(x))))))

    x = torch.randn(16, 4)
    with pytest.raises(TraceError, match=r"name 'gate' in leaf_modules"):
        find_sites(Branchy(), x[:2])
    sites, skipped = find_sites(Branchy(), x[:2], leaf_modules=("gate",))
    assert [s.name for s in sites] == ["b"]
    assert "leaf module 'gate'" in {s.name: s.reason for s in skipped}["a"]
    result = prune(Branchy(), x, PruneConfig(keep=0.5, leaf_modules=("gate",), progress=False))
    assert result.model.b.out_features == 3


def test_other_convolutions_are_listed_and_nothing_to_prune_is_an_error():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.up = nn.Conv1d(3, 4, 3), nn.ConvTranspose2d(4, 2, 2, 2)

        def forward(self, x):  # x: (N, 3, L)
            h = torch.relu(self.c1(x))
            return self.up(h.unsqueeze(2))

    x = torch.randn(4, 3, 8)
    sites, skipped = find_sites(Seq(), x[:2])
    reasons = {s.name: s.reason for s in skipped}
    assert not sites and set(reasons) == {"c1", "up"}
    assert "Conv1d layers are not pruned so far" in reasons["c1"]
    assert "ConvTranspose2d layers are not pruned so far" in reasons["up"]
    with pytest.raises(NothingToPruneError, match="nothing in Seq can be pruned: c1: Conv1d"):
        prune(Seq(), x, PruneConfig(progress=False))
    copy_ = prune(Seq(), x, PruneConfig(allow_unpruned=True, progress=False)).model
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), Seq().eval()(x) * 0 + copy_(x))
    assert _params(copy_) == _params(Seq())


def test_sliced_norms_scales_and_conv_subclasses_save_and_reload(tmp_path):
    from subprune.serialization import load_pruned, save_pruned

    class Net(_TinyViT):
        def __init__(self):
            super().__init__()
            self.patch = Conv2dSame(3, 8, 2, 2)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(30, 3, 6, 6)
    result = prune(model, x, PruneConfig(method="seq", keep=0.5, coupled=True, progress=False))
    save_pruned(result.model, tmp_path / "run")
    torch.manual_seed(1)
    reloaded = load_pruned(tmp_path / "run", model=Net())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x))
    assert type(reloaded.patch) is Conv2dSame and reloaded.norm.normalized_shape == (4,)


class _Attention(nn.Module):
    """timm's Attention: qkv -> (B, N, 3, heads, head_dim) -> scaled dot product -> proj."""

    def __init__(self, dim=8, heads=4, per_head_bias=False, fixed_heads=False):
        super().__init__()
        self.num_heads, self.head_dim, self.fixed = heads, dim // heads, fixed_heads
        self.attn_dim = dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, 1, 1)) if per_head_bias else None

    def forward(self, x):
        b, n, c = x.shape
        heads = 4 if self.fixed else self.num_heads  # a head count written into forward() cannot shrink
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.bias is not None:
            attn = attn + self.bias
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj(x)


class _ViTBlock(nn.Module):
    def __init__(self, per_head_bias=False, fixed_heads=False):
        super().__init__()
        self.embed, self.norm = nn.Linear(3, 8), nn.LayerNorm(8)
        self.attn = _Attention(per_head_bias=per_head_bias, fixed_heads=fixed_heads)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # (N, T, 3)
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1))


def test_attention_heads_recognised_by_behaviour():
    torch.manual_seed(0)
    x = torch.randn(40, 6, 3)
    sites, _ = check(_ViTBlock(), x, coupled=True, expect=["embed", "attn.qkv"])
    heads = sites[1]
    assert (heads.channels, heads.group_size, heads.heads) == (4, 2, ("attn",))
    assert [(p.start, p.span) for p in heads.producers] == [(0, 8), (8, 8), (16, 8)]
    cut = prune_model(_ViTBlock(), sites, {"embed": torch.arange(8), "attn.qkv": torch.tensor([1, 3])})
    assert (cut.attn.num_heads, cut.attn.attn_dim, cut.attn.qkv.out_features, cut.attn.proj.in_features) == (
        2, 4, 12, 4)
    # Block-internal: the heads alone, refit on the calibration set; the head site's cut equals the masked model.
    model = _ViTBlock().eval()
    (site,), _ = find_sites(model, x[:2])
    keep = {site.name: torch.tensor([0, 2])}
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model, [site], keep)(x), _masked(model, [site], keep)(x))
    sites, _ = check(_ViTBlock(per_head_bias=True), x, expect=["attn.qkv"])  # Swin-like per-head table: sliced
    assert [(p.name, p.axis, p.span) for p in sites[0].parameters] == [("attn.bias", 0, 4)]
    _, skipped = find_sites(_ViTBlock(fixed_heads=True), x[:2])
    assert "the attention heads of 'attn' are not pruned" in {s.name: s.reason for s in skipped}["attn.qkv"]


def test_affine_addcmul_and_global_response_norm():
    class Block(nn.Module):  # ResMLP's Affine (addcmul) and ConvNeXt-V2's GRN (a mean over the channels)
        def __init__(self):
            super().__init__()
            self.embed, self.fc1, self.fc2, self.head = nn.Linear(3, 6), nn.Linear(6, 10), nn.Linear(10, 6), \
                nn.Linear(6, 2)
            self.alpha, self.beta = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
            self.gamma, self.delta = nn.Parameter(torch.rand(10)), nn.Parameter(torch.randn(10))

        def forward(self, x):  # (N, T, 3)
            h = torch.addcmul(self.beta, self.alpha, self.embed(x))
            u = F.gelu(self.fc1(h))
            g = u.norm(p=2, dim=1, keepdim=True)  # over tokens: per channel
            u = u + torch.addcmul(self.delta, self.gamma, u * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)))
            return self.head((h + self.fc2(u)).mean(1))

    torch.manual_seed(0)
    sites, _ = check(Block(), torch.randn(40, 5, 3), coupled=True, expect=["embed", "fc1"], method="seq")
    by = {s.name: s for s in sites}
    assert {p.name for p in by["embed"].parameters} == {"alpha", "beta"}
    assert {p.name for p in by["fc1"].parameters} == {"gamma", "delta"} and by["fc1"].renormalised == ("mean",)


def test_split_sizes_held_by_a_module_attribute_shrink():
    class Mixed(nn.Module):  # timm's MixedConv2d: torch.split(x, self.splits, 1), one conv per part, cat
        def __init__(self):
            super().__init__()
            self.splits = [3, 5]
            self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(5, 2, 5, padding=2)])

        def forward(self, x):
            return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, self.splits, 1), strict=True)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.mixed, self.head = nn.Conv2d(3, 8, 1), Mixed(), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.mixed(torch.relu(self.stem(x))).mean((2, 3)))

    sites, _ = check(Net(), torch.randn(16, 3, 6, 6), expect=["stem[0:3]", "stem[3:8]", "mixed.convs.0",
                                                                "mixed.convs.1"])
    cut = prune_model(Net(), sites, {"stem[0:3]": torch.tensor([1]), "stem[3:8]": torch.tensor([0, 4])})
    assert cut.mixed.splits == [1, 2] and cut.stem.out_channels == 3


class _WSConv(nn.Conv2d):
    """Weight standardisation as NFNets' ScaledStdConv2d computes it (per output channel, over its fan-in)."""

    def forward(self, x):
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-6) * w[0].numel() ** -0.5, self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def test_weight_standardised_convs_freeze_to_the_plain_convs_they_compute():
    from subprune.convs import SamePadConv2d, effective_conv, freeze_conv_weights

    class Net(nn.Module):  # an NFNet-like stem and block: every conv standardises its weight
        def __init__(self):
            super().__init__()
            self.a, self.b = _WSConv(3, 8, 3, padding=1), _WSConv(8, 6, 3, stride=2, padding=1, groups=2)
            self.c, self.head = _WSConv(6, 5, 1, bias=False), nn.Linear(5, 4)

        def forward(self, x):
            x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))) * 1.7))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(20, 3, 9, 9)
    original = copy.deepcopy(model.state_dict())
    _, skipped = find_sites(model, x[:2])
    assert {s.name for s in skipped} >= {"a", "b", "c"}  # each reported: no site can refit a standardised consumer
    frozen, replaced = freeze_conv_weights(model, x[:2])
    assert replaced == ["a", "b", "c"] and all(type(getattr(frozen, n)) is nn.Conv2d for n in replaced)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # the user's model is untouched
    assert frozen.c.bias is None and _params(frozen) == _params(model)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), atol=1e-5, rtol=1e-5)
    check(frozen, x, expect=["a", "c"])  # b is grouped: a's site carries it whole groups at a time
    # a module that computes something else than one convolution is left as it is
    class Gated(nn.Conv2d):
        def forward(self, x):
            return torch.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))

    assert effective_conv(Gated(3, 4, 3).eval(), (1, 3, 8, 8)) is None
    from subprune.convs import conv_kind

    same = effective_conv(Conv2dSame(3, 4, 3, stride=2).eval(), (1, 3, 9, 9))  # already a plain "SAME" conv
    assert isinstance(same, SamePadConv2d) and conv_kind(same, (1, 3, 9, 9)) == "same"


# torchvision's code paths, written out without torchvision (issue 15: its only build for torch 2.13 here needs CUDA
# torch, docs/zoo.md): ResNet's BasicBlock (in-place `out += identity`, `torch.flatten(x, 1)`), MobileNetV3's
# Conv2dNormActivation (an nn.Sequential subclass) with SqueezeExcitation (`scale * input`) and ViT's EncoderBlock
# (nn.MultiheadAttention, `torch._assert`, class token cat, `x[:, 0]`).
class _TVBasicBlock(nn.Module):  # torchvision.models.resnet.BasicBlock
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class _TVResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_TVBasicBlock(8, 8))
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer2 = nn.Sequential(_TVBasicBlock(8, 16, 2, downsample))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class _TVMLPBlock(nn.Sequential):
    def __init__(self, d, h):
        super().__init__(nn.Linear(d, h), nn.GELU(), nn.Dropout(0.0), nn.Linear(h, d), nn.Dropout(0.0))


class _TVEncoderBlock(nn.Module):  # torchvision.models.vision_transformer.EncoderBlock
    def __init__(self, heads, d, h):
        super().__init__()
        self.ln_1 = partial(nn.LayerNorm, eps=1e-6)(d)
        self.self_attention = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = partial(nn.LayerNorm, eps=1e-6)(d)
        self.mlp = _TVMLPBlock(d, h)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class _TVViT(nn.Module):
    def __init__(self, image=16, patch=4, d=16, heads=2, h=32, layers=2):
        super().__init__()
        self.patch_size, self.hidden_dim = patch, d
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        seq = (image // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, d).normal_(std=0.02))
        self.layers = nn.Sequential(*[_TVEncoderBlock(heads, d, h) for _ in range(layers)])
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(d, 10))

    def forward(self, x):
        n, c, hh, ww = x.shape
        p = self.patch_size
        torch._assert(hh == 16, "Wrong image height!")
        n_h, n_w = hh // p, ww // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        x = x.permute(0, 2, 1)
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = x + self.pos_embedding
        x = self.ln(self.layers(x))
        x = x[:, 0]
        return self.heads(x)


class _TVConvNormActivation(nn.Sequential):  # torchvision.ops.misc.Conv2dNormActivation
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([act()] if act else []))


class _TVSqueezeExcitation(nn.Module):  # torchvision.ops.misc.SqueezeExcitation
    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, input):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(input)))))
        return scale * input


class _TVMobileNetV3(nn.Module):  # InvertedResidual: expand, depthwise, SE, project (+ residual)
    def __init__(self):
        super().__init__()
        self.stem = _TVConvNormActivation(3, 8, stride=2)
        self.block = nn.Sequential(_TVConvNormActivation(8, 16, 1), _TVConvNormActivation(16, 16, groups=16),
                                   _TVSqueezeExcitation(16, 8), _TVConvNormActivation(16, 8, 1, act=None))
        self.last = _TVConvNormActivation(8, 24, 1)
        self.classifier = nn.Sequential(nn.Linear(24, 12), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(12, 10))

    def forward(self, x):
        x = self.stem(x)
        x = self.last(x + self.block(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def test_torchvision_style_resnet_and_mobilenet_code_paths():
    torch.manual_seed(0)
    model, x = _TVResNet(), torch.randn(8, 3, 32, 32)
    sites, skipped = check(model, x, expect=["layer1.0.conv1", "layer2.0.conv1"])  # residual streams: coupled
    assert "coupled=True" in {s.name: s.reason for s in skipped}["conv1"]
    check(model, x, coupled=True, expect=["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2"])
    model = _TVMobileNetV3()
    sites, _ = check(model, x, coupled=True, expect=["block.0.0", "block.2.fc1", "classifier.0", "last.0", "stem.0"])
    expand = next(s for s in sites if s.name == "block.0.0")  # the depthwise conv and SE gate ride with the expansion
    assert "block.1.0" in expand.groupwise and {p.module for p in expand.producers} >= {"block.0.0", "block.2.fc2"}


def test_torchvision_style_vit_mlps_pruned_multihead_attention_reported():
    torch.manual_seed(0)
    model, x = _TVViT(), torch.randn(8, 3, 16, 16)
    sites, skipped = check(model, x, coupled=True, expect=["layers.0.mlp.0", "layers.1.mlp.0"])
    reasons = {s.name: s.reason for s in skipped}
    assert "MultiheadAttention 'layers.0.self_attention'" in reasons["conv_proj"]  # the stream reaches it
    assert "its heads are not pruned" in reasons["layers.0.self_attention.out_proj"]
    cut = prune(model, x, PruneConfig(method="asym", keep=0.25, coupled=True, progress=False)).model
    assert cut.layers[0].mlp[0].out_features == 8 and cut.layers[0].mlp[3].in_features == 8
