"""Small reference networks: digits/MNIST CNNs, and VGG and MobileNet variants for 32x32 inputs.

All of them trace with :func:`torch.fx.symbolic_trace` (no data-dependent control flow).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import ModelError

__all__ = [
    "VGG",
    "VGG_CFGS",
    "DepthwiseSeparable",
    "DigitsCNN",
    "InvertedResidual",
    "MNISTNet",
    "MobileNetV1",
    "MobileNetV2",
    "mnist_cnn",
    "mobilenet_v1_cifar",
    "mobilenet_v2_cifar",
    "vgg_cifar",
]


def _divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, not going below 90% of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _check_width(width: float) -> None:
    """Raise :class:`ModelError` unless ``width`` is a positive multiplier."""
    if not width > 0:
        raise ModelError(f"width multiplier must be > 0, got {width}")


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A ``k x k`` convolution (no bias, 'same' padding) followed by BatchNorm."""
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class DigitsCNN(nn.Module):
    """Over-parameterised CNN for the 8x8 scikit-learn digits (``N x 1 x 8 x 8``), ~152k params."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 32),
            nn.ReLU(),
            *_conv_bn(32, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)``."""
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class MNISTNet(nn.Module):
    """Small CNN for 28x28 grayscale inputs (MNIST, Fashion-MNIST): two conv blocks, two linears."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *_conv_bn(32, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for inputs ``(N, 1, 28, 28)``."""
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """Build :class:`MNISTNet`."""
    return MNISTNet(num_classes=num_classes)


# fmt: off
VGG_CFGS: Mapping[str, tuple[int | str, ...]] = MappingProxyType({
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
})
# fmt: on


class VGG(nn.Module):
    """VGG for 32x32 inputs: five pooling stages down to 1x1, then one linear classifier."""

    def __init__(self, features: nn.Sequential, out_channels: int, num_classes: int = 10):
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for inputs ``(N, 3, 32, 32)``."""
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def vgg_cifar(
    cfg: str = "vgg11", num_classes: int = 10, width: float = 1.0, batch_norm: bool = True
) -> nn.Module:
    """Build a CIFAR VGG (``cfg`` in ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``).

    ``width`` scales every layer's channels (rounded to a multiple of 8).
    """
    if cfg not in VGG_CFGS:
        raise ModelError(f"unknown VGG config {cfg!r}; known: {', '.join(sorted(VGG_CFGS))}")
    _check_width(width)
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG_CFGS[cfg]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = _divisible(int(item) * width)
        if batch_norm:
            layers += _conv_bn(cin, cout)
        else:
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
        layers.append(nn.ReLU())
        cin = cout
    return VGG(nn.Sequential(*layers), cin, num_classes)


class DepthwiseSeparable(nn.Module):
    """MobileNet-V1 block: depthwise 3x3 (groups = in_channels) then pointwise 1x1, each BN+ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU())
        self.pointwise = nn.Sequential(*_conv_bn(cin, cout, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise then pointwise convolution."""
        return self.pointwise(self.depthwise(x))


# (out_channels, stride) of each depthwise-separable block, CIFAR version (stem has stride 1).
# fmt: off
_MBV1_CFG: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# fmt: on


class MobileNetV1(nn.Module):
    """MobileNet-V1 for 32x32 inputs (stride-1 stem, 3 downsamplings to 4x4)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        _check_width(width)
        cin = _divisible(32 * width)
        self.stem = nn.Sequential(*_conv_bn(3, cin), nn.ReLU())
        blocks: list[nn.Module] = []
        for cout, stride in _MBV1_CFG:
            cout = _divisible(cout * width)
            blocks.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)``."""
        x = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.linear(torch.flatten(x, 1))


def mobilenet_v1_cifar(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build :class:`MobileNetV1` for CIFAR-sized inputs."""
    return MobileNetV1(num_classes=num_classes, width=width)


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection.

    The input is added to the output when ``stride == 1`` and ``cin == cout``.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block forward; ``use_residual`` is fixed at build time, so fx traces it statically."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expansion, out_channels, num_blocks, stride); CIFAR version: stride 1 in the stem and stage 2.
# fmt: off
_MBV2_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
# fmt: on


class MobileNetV2(nn.Module):
    """MobileNet-V2 for 32x32 inputs (stride-1 stem, 3 downsamplings to 4x4)."""

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        _check_width(width)
        cin = _divisible(32 * width)
        self.stem = nn.Sequential(*_conv_bn(3, cin), nn.ReLU6())
        blocks: list[nn.Module] = []
        for expansion, cout, num, stride in _MBV2_CFG:
            cout = _divisible(cout * width)
            for i in range(num):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        last = _divisible(1280 * max(1.0, width))
        self.head = nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU6())
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)``."""
        x = self.head(self.layers(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.linear(torch.flatten(x, 1))


def mobilenet_v2_cifar(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build :class:`MobileNetV2` for CIFAR-sized inputs."""
    return MobileNetV2(num_classes=num_classes, width=width)
