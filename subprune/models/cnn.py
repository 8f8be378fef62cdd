"""Small reference CNN architectures for coverage tests and the speed benchmark.

Hand-written, torchvision-free definitions of the block types users bring:
VGG with BatchNorm, CIFAR ResNet-20 (basic blocks, option-A zero-padding
shortcuts as in He et al. 2016 and the paper's ResNet56), torchvision-style
ResNet basic/bottleneck blocks with strided 1x1 downsample shortcuts,
MobileNetV2 inverted residuals, EfficientNet-style MBConv with
squeeze-and-excitation, DenseNet-style concatenation and a ResNeXt grouped
convolution block. Widths are small so that they run on CPU in tests; each
``make_*`` function returns a randomly initialised model in eval mode with
non-trivial BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subprune.shortcuts import ZeroPadShortcut


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


class VGGBN(nn.Module):
    """VGG-style: [conv-BN-ReLU]x2, pool, [conv-BN-ReLU]x2, pool, adaptive pool to 4x4, flatten, 2 Linear."""

    def __init__(self, widths=(16, 16, 32, 32), classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
"""VGG11 (configuration "A" of Simonyan & Zisserman 2015): output channels of each 3x3 conv, "M" = 2x2 max-pool."""


class VGG(nn.Module):
    """VGG with BatchNorm: [conv3x3-BN-ReLU | max-pool] per ``config`` entry, then a one-hidden-layer classifier.

    Parameters
    ----------
    config : sequence of int or "M"
        Conv output channels (before dividing by ``width_divisor``) and max-pool positions,
        e.g. :data:`VGG11_CONFIG`.
    width_divisor : int, default 1
        Every conv width is ``c // width_divisor``.
    in_channels : int, default 3
    hidden : int, default 512
        Width of the classifier's hidden Linear layer.
    pool : int, default 1
        The features are average-pooled to ``pool x pool`` and flattened before the classifier.
    classes : int, default 10
    """

    def __init__(self, config=VGG11_CONFIG, width_divisor: int = 1, in_channels: int = 3, hidden: int = 512,
                 pool: int = 1, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            w = entry // width_divisor
            layers += [*conv_bn(c, w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(c * pool * pool, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CifarBasicBlock(nn.Module):
    """ResNet basic block for CIFAR; shortcut "A": stride-2 subsample + zero channels
    (:class:`~subprune.shortcuts.ZeroPadShortcut`, prunable), "B": 1x1 conv + BN."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        reshape = stride != 1 or c_in != c_out
        self.downsample = conv_bn(c_in, c_out, 1, stride) if shortcut == "B" and reshape else None
        if shortcut == "A" and reshape:  # x[:, :, ::stride, ::stride] with zero channels on both sides
            pad = (c_out - c_in) // 2
            self.downsample = ZeroPadShortcut(stride, pad, c_out - c_in - pad)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, Sec. 4.2): n = 3 gives ResNet-20, n = 9 ResNet-56."""

    def __init__(self, n: int = 3, widths=(16, 32, 64), classes: int = 10, shortcut: str = "A", in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(CifarBasicBlock(c, w, 2 if stage > 0 and i == 0 else 1, shortcut))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """torchvision-style basic block; 1x1 strided conv + BN downsample when the shape changes."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (stride on the 3x3 conv, as ResNet v1.5); ``groups`` gives ResNeXt."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet (stem conv 7x7/2 + max-pool, 4 stages), at a small base width."""

    def __init__(self, block, layers=(2, 2, 2, 2), base: int = 16, classes: int = 10, **block_args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = base
        stages = []
        for i, count in enumerate(layers):
            planes = base * 2**i
            blocks = []
            for j in range(count):
                blocks.append(block(c, planes, 2 if i > 0 and j == 0 else 1, **block_args))
                c = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, c_out, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """A small MobileNetV2: stem, inverted residuals (t, c, n, s), 1x1 head conv, pool, classifier."""

    def __init__(self, settings=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)), stem: int = 16, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, stem, 3, 2), nn.ReLU6(inplace=True)]
        c = stem
        for t, w, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(c, w, s if i == 0 else 1, t))
                c = w
        layers += [*conv_bn(c, 64, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(conv(silu(conv(mean(x))))), EfficientNet-style."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet MBConv: 1x1 expand -> depthwise -> squeeze-and-excitation -> 1x1 project (+ residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4, se_ratio: float = 0.25):
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(*conv_bn(c_in, hidden, 1), nn.SiLU())
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.SiLU())
        self.se = SqueezeExcite(hidden, max(1, int(c_in * se_ratio)))
        self.project = conv_bn(hidden, c_out, 1)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.use_res else out


class EfficientNetLike(nn.Module):
    """Stem, three MBConv blocks (one residual), head conv, pool, classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16, 3, 2), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16, 1), MBConv(16, 24, 2), MBConv(24, 24, 1))
        self.head = nn.Sequential(*conv_bn(24, 64, 1), nn.SiLU())
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: cat(features) -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv."""

    def __init__(self, c_in: int, growth: int, bottleneck: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNetLike(nn.Module):
    """Stem conv, one dense block of three layers (torchvision's concatenate-every-time form), transition, head."""

    def __init__(self, stem: int = 16, growth: int = 8, layers: int = 3, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.norm0 = nn.BatchNorm2d(stem)
        self.dense = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(layers))
        c = stem + layers * growth
        self.norm_t = nn.BatchNorm2d(c)
        self.conv_t = nn.Conv2d(c, c // 2, 1, bias=False)
        self.fc = nn.Linear(c // 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [F.relu(self.norm0(self.conv0(x)))]
        for layer in self.dense:
            features.append(layer(features))
        x = self.conv_t(F.relu(self.norm_t(torch.cat(features, 1))))
        x = F.avg_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionLike(nn.Module):
    """One tensor read by three branches (1x1, 1x1->3x3, pool->1x1) whose outputs are concatenated."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2a = nn.Conv2d(16, 12, 1)
        self.b2b = nn.Conv2d(12, 16, 3, padding=1)
        self.b3 = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2b(F.relu(self.b2a(x)))),
                       F.relu(self.b3(F.max_pool2d(x, 3, 1, 1)))], 1)
        y = F.relu(self.mix(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _randomise_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


def _make(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return _randomise_batchnorms(factory(), seed)

    make.__doc__ = f"A randomly initialised {factory.__name__ if hasattr(factory, '__name__') else 'model'}."
    return make


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "vgg-bn": _make(VGGBN),
    "cifar-resnet20": _make(lambda: CifarResNet(n=3)),
    "cifar-resnet20-b": _make(lambda: CifarResNet(n=3, shortcut="B")),
    "resnet18": _make(lambda: ResNet(BasicBlock, (2, 2, 2, 2), base=16)),
    "resnet50": _make(lambda: ResNet(Bottleneck, (1, 1, 1, 1), base=8)),
    "mobilenetv2": _make(MobileNetV2),
    "efficientnet-se": _make(EfficientNetLike),
    "densenet": _make(DenseNetLike),
    "inception": _make(InceptionLike),
    "resnext": _make(lambda: ResNet(Bottleneck, (1, 1, 1, 1), base=8, groups=4, base_width=16)),
}
"""Name -> ``make(seed)``: randomly initialised small models taking (N, 3, H, W) images, H = W >= 16."""
