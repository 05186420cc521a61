"""Tied output layers written once in ONNX.

A language model whose output layer shares its weight ``W`` (vocabulary × hidden) with the
input embedding table exports, through ``F.linear``, as ``MatMul(x, Wᵀ)`` with ``Wᵀ``
constant-folded into a second initializer: the file holds the table twice (a tied
32k-vocabulary, 512-wide decoder: 182 MB instead of 116 MB). :func:`untangle_tied_heads`
gives every such float ``nn.Linear`` of the export copy a forward that flattens the tokens
and runs ONNX ``Gemm`` with ``transB=1``, which reads ``W`` itself: the exporter writes one
initializer that the ``Gather`` and the ``Gemm`` share, and ONNX Runtime's GEMM reads the
transposed operand natively. (Computing ``(W · xᵀ)ᵀ`` with ``MatMul`` also kept one copy,
but ran ~37% slower in ONNX Runtime on that decoder.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TiedHead", "untangle_tied_heads"]


class _GemmTransB(torch.autograd.Function):
    """``x · Wᵀ (+ b)`` for 2-D ``x``; ONNX ``Gemm(x, W, b, transB=1)`` in the graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any) -> Any:
        if bias is None or bias.node().mustBeNone():
            return g.op("Gemm", x, weight, transB_i=1)
        return g.op("Gemm", x, weight, bias, transB_i=1)


class TiedHead(nn.Module):
    """A Linear whose weight is an embedding table's too, exported as ``Gemm(transB=1)``
    over the flattened tokens."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter object: the tie is kept
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = _GemmTransB.apply(flat, self.weight, self.bias)
        assert isinstance(y, torch.Tensor)
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


def untangle_tied_heads(model: nn.Module) -> list[str]:
    """Swap (in place: an export copy) every plain ``nn.Linear`` whose weight an
    ``nn.Embedding`` of ``model`` holds too for a :class:`TiedHead`; returns their names."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n and id(m.weight) in tables]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, TiedHead(getattr(owner, leaf)))
    return names
