"""Residual streams of CNNs: the channel groups that several convolutions write into.

Identity shortcuts add every block's last conv to the same channels as the stem, so one
group spans all of them. Cutting it narrows every block's input and output at once; on the
pretrained CIFAR ResNet-56 at 50% MACs, keeping it whole and pruning the blocks' inner
channels measured better (agreement one shot with the least-squares refit, and after
distillation) and ran faster in ONNX Runtime (BENCHMARKS.md, issues 3 and 11).
"""

from __future__ import annotations

from torch import nn

from netpress.graph import ChannelGraph

__all__ = ["residual_streams"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def residual_streams(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """Names of the groups whose units are the output channels of two or more convs and of
    no other layer (a transformer's hidden size, which Linear layers write too, is not
    one)."""
    modules = dict(model.named_modules())
    out = []
    for g in graph.groups:
        writers = [modules.get(path) for (pid, dim) in g.slices if dim == 0
                   for path, attr in graph.trace.owners.get(pid, []) if attr == "weight"]
        layers = [m for m in writers if isinstance(m, (*_CONVS, nn.Linear))]
        if len({id(m) for m in layers}) >= 2 and all(isinstance(m, _CONVS) for m in layers):
            out.append(g.name)
    return out
