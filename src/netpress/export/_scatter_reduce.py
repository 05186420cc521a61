"""ONNX form of ``Tensor.scatter_reduce`` for what torch's exporter refuses:
``include_self=False`` (TAPAS's segment means, sums, maxima and minima) and
``reduce="mean"``.

PyTorch's semantics, for every position ``p`` of ``self`` that ``index`` reaches, the
reduction of the ``src`` values scattered there, with ``self[p]`` taken in only when
``include_self``; positions nobody scatters to keep ``self``. Built from ONNX
``ScatterElements`` (opset 16 or newer, for its ``reduction``):

- ``count``: ones scattered with ``add``, how many sources reach each position;
- ``sum`` / ``prod``: the sources scattered onto the reduction's identity (0 / 1), then
  ``Where(count > 0, that, self)`` (or onto ``self`` itself when ``include_self``);
- ``amax`` / ``amin``: one of the sources first assigned to each reached position, then
  the ``max`` / ``min`` scatter of all of them onto that: no identity value is needed (none
  exists for integers);
- with ``include_self`` (but ``mean``), the reduction's scatter onto ``self``;
- ``mean`` (floating point only): the sum over the count, the count plus one and the sum
  plus ``self`` when ``include_self``, as PyTorch divides.

``src`` is cut to ``index``'s shape, as PyTorch reads it (torch's own form, used before for
``include_self=True``, passed the whole ``src`` and ONNX Runtime refused it). Other forms
(opset under 16, an unknown rank, an integer mean) go to torch's symbolic, which names
what it refuses.
"""

from __future__ import annotations

from typing import Any

__all__ = ["scatter_reduce"]

_ONNX_REDUCTION = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def scatter_reduce(g: Any, x: Any, dim: Any, index: Any, src: Any, reduce: Any,
                   include_self: Any = True) -> Any:
    """``x.scatter_reduce(dim, index, src, reduce, include_self=...)`` (module docstring)."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset16

    axis = sh._maybe_get_const(dim, "i")
    how = sh._maybe_get_const(reduce, "s")
    keep = sh._maybe_get_const(include_self, "b")
    rank = sh._get_tensor_rank(x)
    scalar = sh._try_get_scalar_type(x)
    floating = scalar is not None and scalar.dtype().is_floating_point
    if (g.opset < 16 or not rank or not isinstance(axis, int) or not isinstance(keep, bool)
            or how not in (*_ONNX_REDUCTION, "mean")
            or (how == "mean" and not floating)):
        return symbolic_opset16.scatter_reduce(g, x, dim, index, src, reduce, include_self)
    axis = axis + rank if axis < 0 else axis
    index_rank = sh._get_tensor_rank(index)
    if index_rank == rank and sh._get_tensor_rank(src) == rank:
        zeros = g.op("Constant", value_t=torch.zeros(rank, dtype=torch.int64))
        every = g.op("Constant", value_t=torch.arange(rank, dtype=torch.int64))
        src = g.op("Slice", src, zeros, g.op("Shape", index), every)

    def scatter(base: Any, values: Any, reduction: str | None) -> Any:
        if reduction is None:
            return g.op("ScatterElements", base, index, values, axis_i=axis)
        return g.op("ScatterElements", base, index, values, axis_i=axis,
                    reduction_s=reduction)

    def filled(value: float, like: Any) -> Any:
        return g.op("CastLike", g.op("ConstantOfShape", g.op("Shape", like),
                                     value_t=torch.tensor([value])), like)

    if keep and how != "mean":
        return scatter(x, src, _ONNX_REDUCTION[how])
    if how in ("amax", "amin"):
        return scatter(scatter(x, src, None), src, _ONNX_REDUCTION[how])
    count = scatter(filled(0.0, x), filled(1.0, src), "add")
    if how == "mean":
        total = scatter(x if keep else filled(0.0, x), src, "add")
        if keep:
            count = g.op("Add", count, filled(1.0, count))
        mean = g.op("Div", total, g.op("Max", count, filled(1.0, count)))
        return g.op("Where", g.op("Greater", count, filled(0.0, count)), mean, x)
    identity = filled(0.0 if how == "sum" else 1.0, x)
    reduced = scatter(identity, src, _ONNX_REDUCTION[how])
    return g.op("Where", g.op("Greater", count, filled(0.0, count)), reduced, x)
