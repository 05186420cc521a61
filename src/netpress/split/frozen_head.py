"""Training behind a frozen head: compute the head once per batch and share it.

When a training stage leaves the head fixed and the head is still the original model's
(same weights and statistics, e.g. no pruning before the split), the original model's output
is ``teacher_tail(head(x))`` and the split model's is ``tail(bottleneck(head(x)))``: the
head's output is the same in both. The stage then trains on batches of head outputs
(:class:`HeadOutputs`, computed without gradients) against the teacher's tail, instead of
running the head twice (for the student and the teacher) at every step. Same losses and
gradients; the device head costs one forward pass per batch instead of two, and stage 1 no
longer runs the teacher head at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.data import batches
from netpress.split.bottleneck import Bottleneck
from netpress.split.model import _Stages

__all__ = ["HeadOutputs", "Back", "same_module"]


def same_module(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` hold equal parameters and buffers under the same names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


class HeadOutputs:
    """Re-iterable ``(head(inputs), labels)`` batches of ``data`` (head in eval mode, no
    gradients)."""

    def __init__(self, data: Any, head: nn.Module, device: torch.device) -> None:
        self.data, self.head, self.device = data, head, device

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        self.head.eval()
        for inputs, labels in batches(self.data, name="Split train"):
            with torch.no_grad():
                out = primary_output(call_model(self.head, move_to(inputs, self.device)))
            yield out, labels


class Back(_Stages):
    """``tail(bottleneck(h))``: the split model behind the head (same submodule names)."""

    def __init__(self, bottleneck: Bottleneck, tail: nn.Module) -> None:
        super().__init__()
        self.bottleneck, self.tail = bottleneck, tail

    def forward(self, h: torch.Tensor) -> Any:
        return self.tail(self.bottleneck(h))
