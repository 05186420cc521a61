"""A weighted layer seen as a matrix: its weight as ``(groups, rows, d)`` and its input as
``(groups, samples, d)`` columns, so that ``output = columns @ weightᵀ`` (+ bias).

Covers ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (grouped and depthwise included: one
matrix per conv group; any padding mode; im2col through ``F.unfold``) and the ``Conv1D``
of ``transformers`` (GPT-2's ``y = x W + b``, weight stored transposed).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from netpress._cow import assign_
from netpress.errors import ModelError

__all__ = ["LayerView", "is_hf_conv1d", "supported", "SUPPORTED_TYPES"]

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (without importing transformers)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return isinstance(cls, type) and isinstance(module, cls)


def supported(module: nn.Module) -> bool:
    """True if the module is a layer the reconstruction engine can handle."""
    return type(module) in SUPPORTED_TYPES or is_hf_conv1d(module)


class LayerView:
    """The matrix view of one layer (see the module docstring)."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        if not supported(module):
            raise ModelError(f"layer {name!r} is a {type(module).__name__}; layer-wise "
                             "reconstruction supports Linear, Conv1d, Conv2d and transformers' "
                             "Conv1D")
        self.module, self.name = module, name
        self.hf = is_hf_conv1d(module)
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.groups = int(getattr(module, "groups", 1)) if self.conv else 1

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(groups, rows, d)`` of the matrix view."""
        w = self.weight
        if self.hf:
            return 1, w.shape[1], w.shape[0]
        return self.groups, w.shape[0] // self.groups, w[0].numel()

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The weight as ``(groups, rows, d)`` (a copy in ``dtype``)."""
        return self.matrix_layout(self.weight.detach()).to(dtype).clone()

    def weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """A ``(groups, rows, d)`` tensor (weights or a mask) in the weight's own layout."""
        if tuple(matrix.shape) != self.shape:
            raise ValueError(f"{self.name}: matrix {tuple(matrix.shape)} != {self.shape}")
        flat = matrix.reshape(-1, self.shape[2])
        return flat.T.contiguous() if self.hf else flat.reshape(self.weight.shape)

    def matrix_layout(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`weight_layout`: a weight-shaped tensor as the matrix view."""
        return (t.T if self.hf else t.reshape(t.shape[0], -1)).reshape(self.shape)

    @torch.no_grad()
    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Give the layer's weight the values ``(groups, rows, d)`` (in its dtype) in a new
        storage (copy-on-write: the old one may be the caller's, :func:`netpress._cow.assign_`)."""
        assign_(self.weight, self.weight_layout(matrix))

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input ``x`` as ``(groups, samples, d)`` columns (float32)."""
        x = x.detach().float()
        if not self.conv:
            return x.reshape(1, -1, x.shape[-1])
        m = self.module
        assert isinstance(m, (nn.Conv1d, nn.Conv2d))
        pad = m._reversed_padding_repeated_twice
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pad, mode=mode) if any(pad) else x
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, dil, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            kernel, dil, stride = m.kernel_size, m.dilation, m.stride
        cols = F.unfold(x, kernel, dilation=dil, stride=stride)  # N × (C·k) × L
        d = self.shape[2]
        cols = cols.reshape(cols.shape[0], self.groups, d, -1)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, -1, d)
