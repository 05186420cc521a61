"""Integers recorded by the trace as graph values, as ONNX's 1-D int64 inputs: the sizes,
pads and split points that the netpress symbolics read from traced shapes."""

from __future__ import annotations

from typing import Any

__all__ = ["int64_1d", "int64_concat"]

_INT64 = 7  # onnx.TensorProto.INT64


def int64_1d(g: Any, value: Any) -> Any:
    """One traced integer (any int or float dtype, any rank with one element) as a 1-D int64
    tensor of length 1."""
    import torch

    return g.op("Reshape", g.op("Cast", value, to_i=_INT64),
                g.op("Constant", value_t=torch.tensor([1])))


def int64_concat(g: Any, values: list[Any]) -> Any:
    """Traced integers as one 1-D int64 tensor, in order."""
    return g.op("Concat", *[int64_1d(g, v) for v in values], axis_i=0)
