"""Backbones: image -> last-conv feature map (N, K, H, W), built by name from a registry.

Every backbone ends in its last convolution followed by a ReLU, so the pooled
activations the detectors read are non-negative and comparable across filters.
Each exposes ``out_channels`` (K) and ``forward_taps(x) -> (feature map, taps)``:
the channel means of a few earlier layers ("taps", shallow to deep), which the
detectors read beside the gated layer. Shallow layers see the perturbation itself;
the gated layer sees the decision (docs/detectors.md). Pooling is taken inside the
pass, so a tap costs one mean over a map that was computed anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import CsgguardError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        BACKBONES[name] = fn
        return fn

    return deco


def build_backbone(name: str, *, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise CsgguardError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(BACKBONES))}"
        ) from None
    return factory(in_channels=in_channels, input_size=input_size, width=width)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A VGG-style CNN for small grey images (8x8 digits, 28x28 MNIST).

    Stages of two 3x3 convs with max-pooling until the map is at most 7x7, then the
    last conv with K filters (the gated layer).
    """

    def __init__(self, in_channels: int = 1, input_size: int = 28, width: int = 32, num_filters: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, input_size
        w = width
        while size > 7:
            layers += _conv_bn_relu(c, w) + _conv_bn_relu(w, w) + [nn.MaxPool2d(2)]
            c, size, w = w, size // 2, w * 2
        if not layers:  # tiny inputs (8x8 digits fall through once, 7x7 or less none)
            layers += _conv_bn_relu(c, w)
            c = w
        layers += _conv_bn_relu(c, c)
        self.body = nn.Sequential(*layers)
        self.last = nn.Sequential(*_conv_bn_relu(c, num_filters))
        self.out_channels = num_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.body(x))

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last map, and the channel means after every ReLU of the body."""
        taps = []
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                taps.append(x.mean(dim=(2, 3)))
        return self.last(x), taps


@register("small_cnn")
def small_cnn(*, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    # 16 base channels on MNIST-sized inputs keep an epoch to about a minute on one CPU core
    return SmallCNN(in_channels, input_size, width=32 if input_size <= 16 else 16, num_filters=width or 128)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, last_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-20/32/56 for 32x32 images (He et al. 2016, section 4.2): 16-32-64 widths, K=64."""

    def __init__(self, depth: int = 20, in_channels: int = 3, base: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise CsgguardError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        cin = base
        for i, cout in enumerate((base, base * 2, base * 4)):
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last map, and the channel means of the stem and of every stage but the last
        (the feature ensemble of Lee et al. 2018, less the gated layer itself)."""
        x = self.stem(x)
        taps = [x.mean(dim=(2, 3))]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 < len(self.blocks) and self.blocks[i + 1].conv1.stride[0] == 2:
                taps.append(x.mean(dim=(2, 3)))
        return x, taps


@register("resnet20")
def resnet20(*, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    return CifarResNet(20, in_channels, base=(width or 64) // 4)


@register("resnet32")
def resnet32(*, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    return CifarResNet(32, in_channels, base=(width or 64) // 4)


class _TorchvisionTrunk(nn.Module):
    """A torchvision ResNet without its pooling and fc: the last residual stage is the gated layer."""

    def __init__(self, net: nn.Module, in_channels: int, out_channels: int):
        super().__init__()
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last map, and the channel means after the stem and layers 1-3."""
        taps = []
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i in (2, 4, 5, 6):  # relu, layer1, layer2, layer3
                taps.append(x.mean(dim=(2, 3)))
        return x, taps


def _fixed_width(arch: str, width: int | None, k: int) -> int:
    """torchvision trunks have a fixed K: a different ``width`` is an error, never silently ignored."""
    if width is not None and width != k:
        raise CsgguardError(f"{arch} has a fixed width of {k} filters in its last stage; "
                            f"drop --width {width} (or pick small_cnn/resnet20/resnet32, whose width is free)")
    return k


@register("resnet18")
def resnet18(*, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    from torchvision.models import resnet18 as tv

    return _TorchvisionTrunk(tv(weights=None), in_channels, _fixed_width("resnet18", width, 512))


@register("resnet50")
def resnet50(*, in_channels: int, input_size: int, width: int | None = None) -> nn.Module:
    from torchvision.models import resnet50 as tv

    return _TorchvisionTrunk(tv(weights=None), in_channels, _fixed_width("resnet50", width, 2048))
