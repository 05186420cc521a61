"""CIFAR ResNets (He et al. 2016), as in ``akamaster/pytorch_resnet_cifar10``.

The network is ``conv1 -> bn1 -> relu -> layer1 -> layer2 -> layer3 -> avgpool -> linear``, with
depth ``6n + 2`` (n BasicBlocks per stage, 16/32/64 channels). Two shortcut kinds:

* option ``"A"`` (the paper's CIFAR choice and the pretrained akamaster weights): a parameter-free
  shortcut that subsamples by 2 and zero-pads the channels (:class:`PadShortcut`);
* option ``"B"``: a 1x1 convolution plus BatchNorm where the shape changes.

Every model here traces with :func:`torch.fx.symbolic_trace`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import ArtefactError, ModelError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "find_pretrained",
    "load_pretrained_cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad ``planes // 4`` channels each side.

    It has no parameters and no buffers, so it adds nothing to the state_dict.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample ``x`` spatially by 2 and pad its channel dimension with zeros."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = _make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward pass."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def _make_shortcut(in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> nn.Module:
    """Build the shortcut branch of a block for option ``"A"`` or ``"B"``."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if shortcut == "A":
        if planes != 2 * in_planes or stride != 2:
            raise ModelError(
                f"option-A shortcut needs stride 2 and planes = 2 * in_planes, got in_planes="
                f"{in_planes}, planes={planes}, stride={stride}; use shortcut='B'"
            )
        return PadShortcut(planes)
    if shortcut == "B":
        return nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    raise ModelError(f"unknown shortcut option {shortcut!r}: use 'A' or 'B'")


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with three stages of ``num_blocks`` BasicBlocks each."""

    def __init__(self, num_blocks: int, num_classes: int = 10, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, num_blocks, 1, shortcut)
        self.layer2 = _make_stage(16, 32, num_blocks, 2, shortcut)
        self.layer3 = _make_stage(32, 64, num_blocks, 2, shortcut)
        self.linear = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, 3, H, W)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def _make_stage(
    in_planes: int, planes: int, num_blocks: int, stride: int, shortcut: Shortcut
) -> nn.Sequential:
    """A stage: the first block has ``stride``, the others stride 1."""
    blocks = [BasicBlock(in_planes, planes, stride, shortcut)]
    blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal init of conv and linear weights, as in the reference implementation."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: Shortcut = "A") -> nn.Module:
    """Build a CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ModelError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56), got {depth}"
        )
    if shortcut not in ("A", "B"):
        raise ModelError(f"unknown shortcut option {shortcut!r}: use 'A' or 'B'")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut)


def resnet20(**kw: Any) -> nn.Module:
    """ResNet-20 for CIFAR (0.27M parameters with option A)."""
    return cifar_resnet(20, **kw)


def resnet32(**kw: Any) -> nn.Module:
    """ResNet-32 for CIFAR (0.46M parameters with option A)."""
    return cifar_resnet(32, **kw)


def resnet44(**kw: Any) -> nn.Module:
    """ResNet-44 for CIFAR (0.66M parameters with option A)."""
    return cifar_resnet(44, **kw)


def resnet56(**kw: Any) -> nn.Module:
    """ResNet-56 for CIFAR (0.85M parameters with option A)."""
    return cifar_resnet(56, **kw)


def find_pretrained(depth: int, data_dir: str | Path) -> Path:
    """Find ``resnet{depth}-*.th`` in ``data_dir`` or in its ``cifar10_resnets_akamaster/``."""
    base = Path(data_dir)
    for folder in (base, base / "cifar10_resnets_akamaster"):
        hits = sorted(folder.glob(f"resnet{depth}-*.th"))
        if hits:
            return hits[0]
    raise ArtefactError(
        f"no pretrained checkpoint resnet{depth}-*.th in {base} or "
        f"{base / 'cifar10_resnets_akamaster'}; point data_dir at the shared data folder "
        "(NETPRESS_DATA=../shared/data)"
    )


def load_pretrained_cifar_resnet(depth: int, path: str | Path) -> nn.Module:
    """Build an option-A ResNet of ``depth`` and load an akamaster checkpoint into it (eval mode).

    The checkpoint is read with ``weights_only=True``; the ``module.`` prefix of its keys is
    stripped and the state_dict is loaded strictly.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtefactError(f"pretrained checkpoint {p} does not exist; check the path")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtefactError(f"cannot read {p} as a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ArtefactError(
            f"{p} is not an akamaster CIFAR ResNet checkpoint: expected a dict with a "
            "'state_dict' entry"
        )
    state = {_strip_prefix(k): v for k, v in ckpt["state_dict"].items()}
    model = cifar_resnet(depth, shortcut="A")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtefactError(
            f"{p} does not fit an option-A ResNet-{depth}: {exc}; check the depth matches the file"
        ) from exc
    return model.eval()


def _strip_prefix(key: str, prefix: str = "module.") -> str:
    """Remove the ``nn.DataParallel`` prefix from a state_dict key."""
    return key.removeprefix(prefix)
