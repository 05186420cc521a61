"""ONNX form of antialiased resizing, ``F.interpolate(..., mode="bilinear" | "bicubic",
antialias=True)`` (DINOv2 with registers interpolates its position embeddings so), which
torch's exporter has no symbolic for.

ONNX ``Resize`` has had an ``antialias`` attribute since opset 18. Measured against
PyTorch's ``_upsample_{bilinear,bicubic}2d_aa`` (PIL's filters: the kernel is widened by
the scale when shrinking), ONNX Runtime matches it to float32 rounding with
``coordinate_transformation_mode="half_pixel"``, ``exclude_outside=1`` and, for bicubic,
``cubic_coeff_a=-0.5`` (PIL's; the non-antialiased bicubic uses -0.75), for shrinking and
enlarging alike. ``align_corners=True`` matched no ONNX setting, so it is refused, as is an
opset under 18 (with the opset that has it).
"""

from __future__ import annotations

from typing import Any

from netpress.export._graph_ints import int64_concat

__all__ = ["upsample_bicubic2d_aa", "upsample_bilinear2d_aa"]


def _resize(g: Any, x: Any, output_size: Any, align_corners: Any, scale_factors: Any,
            mode: str) -> Any:
    import torch
    from torch.onnx import errors
    from torch.onnx import symbolic_helper as sh

    if g.opset < 18:
        raise errors.SymbolicValueError(
            f"antialiased {mode} resizing is ONNX Resize's 'antialias', added in version 18",
            x)
    if sh._maybe_get_const(align_corners, "b") is True:
        raise errors.SymbolicValueError(
            f"antialiased {mode} resizing with align_corners=True has no ONNX Resize "
            "setting that computes what PyTorch does; use align_corners=False", x)
    attrs: dict[str, Any] = {
        "mode_s": "cubic" if mode == "bicubic" else "linear", "antialias_i": 1,
        "coordinate_transformation_mode_s": "half_pixel", "exclude_outside_i": 1}
    if mode == "bicubic":
        attrs["cubic_coeff_a_f"] = -0.5
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    if sh._is_none(output_size):
        factors = [float(f) for f in sh._get_const(scale_factors, "fs", "scale_factors")]
        scales = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *factors]))
        return g.op("Resize", x, empty, scales, **attrs)
    lead = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])),
                g.op("Constant", value_t=torch.tensor([2])))
    sizes = int64_concat(g, sh._unpack_list(output_size)) \
        if sh._is_packed_list(output_size) else g.op("Cast", output_size, to_i=7)  # INT64
    return g.op("Resize", x, empty, empty, g.op("Concat", lead, sizes, axis_i=0), **attrs)


def upsample_bicubic2d_aa(g: Any, x: Any, output_size: Any, align_corners: Any,
                          scale_factors: Any = None, *_: Any) -> Any:
    """``aten::_upsample_bicubic2d_aa``: ``Resize(mode="cubic", antialias=1)``."""
    return _resize(g, x, output_size, align_corners, scale_factors, "bicubic")


def upsample_bilinear2d_aa(g: Any, x: Any, output_size: Any, align_corners: Any,
                           scale_factors: Any = None, *_: Any) -> Any:
    """``aten::_upsample_bilinear2d_aa``: ``Resize(mode="linear", antialias=1)``."""
    return _resize(g, x, output_size, align_corners, scale_factors, "bilinear")
