"""Reference model definitions: CIFAR ResNets, VGG, MobileNets and small digit/MNIST CNNs.

Use :func:`build_model` with a name from :data:`MODELS`, or call the builders directly.
Pretrained akamaster CIFAR ResNets load with :func:`load_pretrained_cifar_resnet`; local
Hugging Face ``transformers`` directories with :func:`from_pretrained` (and compressed ones are
written back with :func:`save_pretrained`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

from torch import nn

from netpress.errors import ModelError
from netpress.models.cifar_resnet import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
    find_pretrained,
    load_pretrained_cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from netpress.models.hf import from_pretrained, save_pretrained
from netpress.models.small import (
    DigitsCNN,
    MNISTNet,
    MobileNetV1,
    MobileNetV2,
    mnist_cnn,
    mobilenet_v1_cifar,
    mobilenet_v2_cifar,
    vgg_cifar,
)

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "DigitsCNN",
    "MNISTNet",
    "MobileNetV1",
    "MobileNetV2",
    "PadShortcut",
    "build_model",
    "cifar_resnet",
    "find_pretrained",
    "from_pretrained",
    "load_pretrained_cifar_resnet",
    "mnist_cnn",
    "mobilenet_v1_cifar",
    "mobilenet_v2_cifar",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "save_pretrained",
    "vgg_cifar",
]

#: Name -> builder. Read-only; builders take keyword arguments such as ``num_classes``.
MODELS: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "cifar_resnet20": partial(cifar_resnet, 20),
        "cifar_resnet32": partial(cifar_resnet, 32),
        "cifar_resnet44": partial(cifar_resnet, 44),
        "cifar_resnet56": partial(cifar_resnet, 56),
        "cifar_resnet20_b": partial(cifar_resnet, 20, shortcut="B"),
        "cifar_resnet56_b": partial(cifar_resnet, 56, shortcut="B"),
        "vgg11_cifar": partial(vgg_cifar, "vgg11"),
        "vgg16_cifar": partial(vgg_cifar, "vgg16"),
        "mobilenet_v1_cifar": mobilenet_v1_cifar,
        "mobilenet_v2_cifar": mobilenet_v2_cifar,
        "digits_cnn": DigitsCNN,
        "mnist_cnn": mnist_cnn,
    }
)


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build the registered model ``name`` (see :data:`MODELS`), passing ``kw`` to its builder."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return builder(**kw)
