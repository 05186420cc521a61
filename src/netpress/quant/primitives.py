"""Affine quantization maths as pure functions on tensors (no modules, no data loaders).

A real value ``x`` maps to an integer code ``q = clamp(round(x / scale) + zero_point, qmin,
qmax)`` and back to ``(q - zero_point) * scale``. Rounding is half to even, as ONNX's
QuantizeLinear does, so the fake-quant model and an exported QDQ model agree.

Granularity is given by where the quantization parameters live:

* per tensor: ``scale`` and ``zero_point`` are scalars (``axis=None, group_size=None``);
* per channel: 1-D of length ``x.shape[axis]`` (``axis=k``);
* per group: shape ``(*x.shape[:-1], x.shape[-1] // group_size)``: consecutive blocks of
  ``group_size`` elements along the last dim share parameters (``group_size=g``).

Symmetric quantization uses the restricted signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
with zero point 0 (the range ONNX Runtime uses for symmetric int8 weights); asymmetric uses
the full unsigned ``[0, 2^b - 1]`` by default. Bit widths 2 to 8 are supported.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "qrange",
    "code_dtype",
    "minmax",
    "choose_qparams",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize",
    "round_ste",
    "sqnr",
]

MIN_BITS, MAX_BITS = 2, 8
_EPS = 1e-12  # smallest scale: keeps all-zero tensors finite


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} must be an int in [{MIN_BITS}, {MAX_BITS}]")


def qrange(bits: int, *, symmetric: bool, signed: bool | None = None) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer codes.

    Symmetric: signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` (so zero sits in the middle, zero point
    0). Asymmetric: unsigned ``[0, 2^b-1]`` unless ``signed=True`` (``[-2^(b-1), 2^(b-1)-1]``).
    """
    _check_bits(bits)
    if symmetric:
        if signed is False:
            raise ValueError("symmetric quantization uses signed codes")
        half = 2 ** (bits - 1) - 1
        return -half, half
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def code_dtype(qmin: int) -> torch.dtype:
    """The storage dtype of codes: int8 for signed ranges, uint8 for unsigned ones."""
    return torch.int8 if qmin < 0 else torch.uint8


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % group_size:
        raise ValueError(f"the last dim of shape {tuple(x.shape)} is not a multiple of "
                         f"group_size={group_size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def minmax(x: torch.Tensor, *, axis: int | None = None,
           group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of ``x`` per tensor, per channel (``axis``) or per group."""
    x = x.detach()
    if group_size is not None:
        g = _grouped(x, group_size)
        return g.amin(-1), g.amax(-1)
    if axis is None:
        return x.amin(), x.amax()
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return moved.amin(1), moved.amax(1)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int = 8, *,
                   symmetric: bool = False, signed: bool | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` covering ``[min_val, max_val]`` (widened to include 0).

    Works elementwise, so per-channel or per-group minima give per-channel or per-group
    parameters. ``zero_point`` is an int32 tensor with values in ``[qmin, qmax]``; symmetric
    parameters have zero point 0, and 0.0 is always exactly representable.
    """
    qmin, qmax = qrange(bits, symmetric=symmetric, signed=signed)
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None,
               group_size: int | None) -> torch.Tensor:
    """Reshape parameters ``p`` so they broadcast against ``x``."""
    if p.dim() == 0:
        return p
    if group_size is not None:
        return p.repeat_interleave(group_size, dim=-1)
    if axis is None:
        raise ValueError(f"non-scalar parameters of shape {tuple(p.shape)} need axis= or "
                         "group_size=")
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    *, symmetric: bool = False, signed: bool | None = None,
                    axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (int8 for signed ranges, uint8 for unsigned ones)."""
    qmin, qmax = qrange(bits, symmetric=symmetric, signed=signed)
    s = _broadcast(scale.to(x.dtype), x, axis, group_size)
    z = _broadcast(zero_point.to(x.dtype), x, axis, group_size)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return q.to(code_dtype(qmin))


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *,
                      axis: int | None = None, group_size: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` of codes ``q``."""
    s = _broadcast(scale.to(dtype), q, axis, group_size)
    z = _broadcast(zero_point.to(dtype), q, axis, group_size)
    return (q.to(dtype) - z) * s


class _RoundSTE(torch.autograd.Function):
    """``round`` in the forward pass (bit-exact), identity gradient in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, with a straight-through gradient."""
    out = _RoundSTE.apply(x)
    assert isinstance(out, torch.Tensor)
    return out


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, *,
                  symmetric: bool = False, signed: bool | None = None,
                  axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """Quantize then dequantize, differentiably (LSQ-style straight-through estimator).

    The forward values equal ``dequantize_affine(quantize_affine(x, ...))`` exactly. The
    gradient w.r.t. ``x`` is 1 inside the clipping range and 0 outside; ``scale`` gets the
    LSQ gradient when it requires grad.
    """
    qmin, qmax = qrange(bits, symmetric=symmetric, signed=signed)
    s = _broadcast(scale.to(x.dtype), x, axis, group_size)
    z = _broadcast(zero_point.to(x.dtype), x, axis, group_size)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if float(noise) == 0.0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
