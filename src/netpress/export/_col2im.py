"""ONNX form of ``F.fold`` (``aten::col2im``), for an ``output_size`` read from traced sizes
too.

MobileViT-V2 folds its patches back to the feature map's own height and width
(``output_size=(img_height, img_width)`` from ``feature_map.shape``). The trace records that
size as a list of traced values, and torch's opset-18 symbolic, which reads the size's
length from a recorded tensor type, stopped on it with ``TypeError: 'NoneType' object is
not subscriptable``. Here the list becomes a 1-D int64 tensor (``Concat``) and its length is
the list's. The pads are laid out as ONNX reads them (every axis's begin, then every
end; torch's symbolic repeats each axis's pad in place, and ONNX Runtime refused its graph
where the height's and width's pads differ). Below opset 18 (ONNX ``Col2Im`` came with it)
this form is not registered, and torch's refusal names the opset that has it.
"""

from __future__ import annotations

from typing import Any

from netpress.export._graph_ints import int64_concat

__all__ = ["col2im"]


def col2im(g: Any, x: Any, output_size: Any, kernel_size: Any, dilation: Any, padding: Any,
           stride: Any) -> Any:
    """``aten::col2im``: ONNX ``Col2Im`` with a traced ``output_size`` (module docstring)."""
    import torch
    from torch.onnx import errors
    from torch.onnx import symbolic_helper as sh

    if g.opset < 18:  # not registered below 18 (``_symbolics._MIN_OPSET``); kept as a guard
        raise errors.UnsupportedOperatorError("aten::col2im", g.opset, 18)

    def as_tensor(v: Any, name: str) -> tuple[Any, int]:
        if sh._is_packed_list(v):
            items = sh._unpack_list(v)
            return int64_concat(g, items), len(items)
        got = [int(i) for i in sh._get_const(v, "is", name)]
        return g.op("Constant", value_t=torch.tensor(got, dtype=torch.int64)), len(got)

    size, axes = as_tensor(output_size, "output_size")
    kernel, _ = as_tensor(kernel_size, "kernel_size")

    def ints(v: Any, name: str, default: int) -> list[int]:
        got = [int(i) for i in sh._get_const(v, "is", name)]
        return got or [default] * axes

    pads = ints(padding, "padding", 0) * 2  # ONNX: every axis's begin, then every end
    return g.op("Col2Im", x, size, kernel, dilations_i=ints(dilation, "dilation", 1),
                pads_i=pads, strides_i=ints(stride, "stride", 1))
