"""The split model and its two deployable halves.

:class:`SplitModel` runs ``tail(bottleneck(head(x)))`` in one process (for training and for
measuring agreement). :meth:`SplitModel.device_part` is what runs on the device: the head and
the encoder, returning the integer codes as ``uint8`` (bits <= 8); :meth:`SplitModel.server_part`
is what runs on the server: the decoder and the tail, from those codes to the output.
Both are plain modules that trace with ``torch.fx``, so they save as ``.npress`` artefacts and
export to ONNX like any model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from netpress.split.bottleneck import Bottleneck

__all__ = ["SplitModel", "DevicePart", "ServerPart", "find_split"]


class _Stages(nn.Module):
    """``frozen`` names submodules that stay in eval mode when the module trains (a training
    stage that keeps them fixed must not move their BatchNorm statistics either);
    ``frozen_bn`` names submodules whose BatchNorm layers alone stay in eval mode (their
    weights train, their running statistics stay: ``Split(head_bn="frozen")``)."""

    frozen: tuple[str, ...] = ()
    frozen_bn: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> _Stages:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        for name in self.frozen_bn:
            for m in self.get_submodule(name).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


class SplitModel(_Stages):
    """``tail(bottleneck(head(x)))``; ``at`` names the module the model was cut after."""

    def __init__(self, head: fx.GraphModule, bottleneck: Bottleneck, tail: fx.GraphModule,
                 at: str = "") -> None:
        super().__init__()
        self.head, self.bottleneck, self.tail = head, bottleneck, tail
        self.at = at

    def forward(self, x: torch.Tensor) -> Any:
        return self.tail(self.bottleneck(self.head(x)))

    def device_part(self) -> DevicePart:
        return DevicePart(self.head, self.bottleneck)

    def server_part(self) -> ServerPart:
        return ServerPart(self.bottleneck, self.tail)

    def front(self) -> _Front:
        """Head plus bottleneck (what stage 1 of the training matches to the original head)."""
        return _Front(self.head, self.bottleneck)


class _Front(_Stages):
    def __init__(self, head: fx.GraphModule, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.head, self.bottleneck = head, bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.head(x))


class DevicePart(nn.Module):
    """The device side: input -> uint8 codes."""

    def __init__(self, head: fx.GraphModule, bottleneck: Bottleneck) -> None:
        super().__init__()
        self.head, self.bottleneck = head, bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck.codes(self.head(x)).to(torch.uint8)


class ServerPart(nn.Module):
    """The server side: uint8 codes -> the model's output."""

    def __init__(self, bottleneck: Bottleneck, tail: fx.GraphModule) -> None:
        super().__init__()
        self.bottleneck, self.tail = bottleneck, tail

    def forward(self, codes: torch.Tensor) -> Any:
        return self.tail(self.bottleneck.decode(codes.float()))


def find_split(model: nn.Module) -> SplitModel | None:
    """The :class:`SplitModel` in ``model`` (itself or a submodule), if any."""
    for m in model.modules():
        if isinstance(m, SplitModel):
            return m
    return None
