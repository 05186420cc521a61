"""ONNX form of constant padding (``F.pad(x, pad)``, ``aten::constant_pad_nd``) whose pads
do not depend on the rank the exporter recorded for ``x``.

torch's symbolic writes ONNX's pads (a begin and an end for every dim) from the rank in
``x``'s recorded type. That type can be wrong: in BailingHybrid's INT8 linear attention the
pieces of a ``tensor_split`` kept as an ONNX sequence were recorded with another split's
rank, and ONNX Runtime refused the ``Pad`` (pads for rank 3 on a rank-4 tensor). The
pads there were computed from the traced length (chunked attention pads the sequence to a
multiple of the chunk). Where the pads are computed in the graph anyway, here the leading
zeros come from ``x``'s rank read in the graph too (``Size(Shape(x))``), so the pads fit
whatever ``x`` is at run time (PyTorch's order: last dim first). Pads known when exporting
keep torch's form: its pads are constants, which ONNX Runtime's integer rewrites of
``Pad`` need (a wrong recorded rank with constant pads is not guarded). Other modes go to
torch's symbolic.
"""

from __future__ import annotations

from typing import Any

from netpress.export._graph_ints import int64_1d

__all__ = ["constant_pad_nd", "pad"]


def constant_pad_nd(g: Any, x: Any, padding: Any, value: Any = None) -> Any:
    """``aten::constant_pad_nd``: ``Pad(mode="constant")``; pads computed in the graph are
    laid out by ``x``'s rank read in the graph (module docstring)."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset11

    if not sh._is_packed_list(padding) or all(
            sh._is_constant(v) for v in sh._unpack_list(padding)):
        # pads known when exporting: torch's form, whose pads are constants (ONNX
        # Runtime's integer rewrites of Pad need them so)
        return symbolic_opset11.constant_pad_nd(g, x, padding, value)
    items = [int64_1d(g, v) for v in sh._unpack_list(padding)]
    if len(items) % 2:
        return symbolic_opset11.constant_pad_nd(g, x, padding, value)
    k = len(items) // 2
    begins = [items[2 * (k - 1 - j)] for j in range(k)]  # dims rank-k .. rank-1
    ends = [items[2 * (k - 1 - j) + 1] for j in range(k)]
    rank = g.op("Reshape", g.op("Size", g.op("Shape", x)),
                g.op("Constant", value_t=torch.tensor([1])))
    missing = g.op("Sub", rank, g.op("Constant", value_t=torch.tensor([k])))
    lead = g.op("ConstantOfShape", missing, value_t=torch.tensor([0], dtype=torch.int64))
    pads = g.op("Concat", lead, *begins, lead, *ends, axis_i=0)
    fill = sh._if_scalar_type_as(sh._maybe_get_scalar(value), x)
    return g.op("Pad", x, pads, fill, mode_s="constant")


def pad(g: Any, x: Any, padding: Any, mode: Any, value: Any) -> Any:
    """``aten::pad``: the constant mode as above, other modes by torch's symbolic."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset11

    if sh._parse_arg(mode, "s") == "constant":
        return constant_pad_nd(g, x, padding, value)
    return symbolic_opset11.pad(g, x, padding, mode, value)
