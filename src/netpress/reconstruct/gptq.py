"""GPTQ (Frantar et al. 2023): weight quantization with OBS error compensation, pure maths.

Columns are rounded one at a time (:func:`~netpress.reconstruct.obs.obs_sweep`); each
rounding error is spread over the columns not yet rounded, weighted by the inverse Hessian
of the layer's inputs, so the layer's outputs move as little as possible. Options:

* ``group_size``: consecutive columns share a scale (and zero point); ``None`` = per row.
  Without ``act_order`` each group's parameters come from its *current* (compensated)
  weights when the sweep reaches it; with it they are fixed up front from the original
  weights ("static groups"), so groups stay consecutive columns in storage.
* ``act_order``: columns are visited by decreasing ``diag H`` (most active inputs first).
* ``symmetric``: signed codes in ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0, else
  unsigned ``[0, 2^b-1]`` with a zero point per group (0.0 is always exactly representable,
  so masked weights stay exactly zero).

Scales are rounded to float16 values, so the artefact can store them in two bytes.
:func:`gptq_round` is the rounding alone, for callers that fix their own scales (e.g.
INT8 per-channel weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netpress.quant.observers import mse_range
from netpress.quant.primitives import choose_qparams, code_dtype, minmax, qrange
from netpress.reconstruct.obs import Handover, hinv_cholesky, obs_sweep, read

__all__ = ["GPTQResult", "group_qparams", "gptq_quantize", "gptq_round", "rtn_quantize",
           "OBSERVERS"]

OBSERVERS = ("minmax", "mse")
_HALF_MIN, _HALF_MAX = 2.0 ** -14, 65504.0


@dataclass(frozen=True)
class GPTQResult:
    """Quantized weights: ``weight = (codes - zero[:, col // g]) * scale[:, col // g]``."""

    weight: torch.Tensor   # rows × d, dequantized, in the input's dtype
    codes: torch.Tensor    # rows × d, int8 (symmetric) or uint8
    scale: torch.Tensor    # rows × groups, float32 holding float16 values
    zero: torch.Tensor     # rows × groups, int32 (all 0 when symmetric)
    loss: torch.Tensor     # rows: the output error the sweep accounted for (0 for RTN)


def group_qparams(w: torch.Tensor, bits: int, *, symmetric: bool,
                  observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero_point)`` of ``w`` (rows × g); scales rounded to float16."""
    rows = w.detach().float()
    lo, hi = mse_range(rows, bits, symmetric=symmetric) if observer == "mse" \
        else minmax(rows, axis=0)
    scale, zero = choose_qparams(lo, hi, bits, symmetric=symmetric)
    scale = scale.clamp(_HALF_MIN, _HALF_MAX).half().float()
    if not symmetric:  # re-derive the zero point for the rounded scale
        qmin, qmax = qrange(bits, symmetric=False)
        lo = torch.clamp(lo.float(), max=0.0)
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero


class _Rounder:
    """The column callback of GPTQ: round to the grid of the column's group."""

    def __init__(self, bits: int, symmetric: bool, scale: torch.Tensor, zero: torch.Tensor,
                 groups: torch.Tensor, mask: torch.Tensor | None, observer: str | None,
                 group_size: int) -> None:
        self.qmin, self.qmax = qrange(bits, symmetric=symmetric)
        self.bits, self.symmetric = bits, symmetric
        self.scale, self.zero, self.groups, self.mask = scale, zero, groups, mask
        self.observer, self.group_size = observer, group_size

    def __call__(self, j: int, i: int, block: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        g = int(self.groups[j])
        if self.observer is not None and j % self.group_size == 0:  # dynamic group params
            s, z = group_qparams(block[:, i:i + self.group_size], self.bits,
                                 symmetric=self.symmetric, observer=self.observer)
            self.scale[:, g], self.zero[:, g] = s, z
        w = block[:, i]
        s = self.scale[:, g].to(w.dtype)
        z = self.zero[:, g].to(w.dtype)
        q = torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)
        if self.mask is not None:
            q = torch.where(self.mask[:, j], q, z)
        return (q - z) * s


def _layout(cols: int, group_size: int | None) -> tuple[int, torch.Tensor]:
    g = cols if group_size is None else group_size
    return g, torch.arange(cols) // g


def _grid(weight: torch.Tensor, g: int, bits: int, *, symmetric: bool,
          observer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points per row and group of ``g`` columns, from ``weight`` (or
    placeholders for the sweep to fill when ``observer`` is None)."""
    rows, cols = weight.shape
    n_groups = -(-cols // g)
    scale = torch.ones(rows, n_groups, dtype=torch.float32, device=weight.device)
    zero = torch.zeros(rows, n_groups, dtype=torch.int32, device=weight.device)
    if observer is not None:
        for k in range(n_groups):
            scale[:, k], zero[:, k] = group_qparams(weight[:, k * g:(k + 1) * g], bits,
                                                    symmetric=symmetric, observer=observer)
    return scale, zero


def _codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, groups: torch.Tensor,
           bits: int, symmetric: bool) -> torch.Tensor:
    qmin, qmax = qrange(bits, symmetric=symmetric)
    s = scale[:, groups].to(weight.dtype)
    z = zero[:, groups].to(weight.dtype)
    q = torch.clamp(torch.round(weight / s) + z, qmin, qmax)
    return q.to(code_dtype(qmin))


def _sweep(weight: torch.Tensor, hessian: torch.Tensor | Handover, rounder: _Rounder, *,
           act_order: bool, blocksize: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the sweep (in act order when asked); weights and losses in the original order.
    A :class:`~netpress.reconstruct.obs.Handover` Hessian is consumed by the factorization."""
    cols = weight.shape[1]
    perm = torch.sort(-torch.diagonal(read(hessian)), stable=True).indices if act_order \
        else torch.arange(cols)
    rounder.groups = rounder.groups[perm]
    if rounder.mask is not None:
        rounder.mask = rounder.mask[:, perm]
    # permuted inside: one d x d copy fewer at the peak
    u = hinv_cholesky(hessian, damp, perm=perm if act_order else None)
    out, loss = obs_sweep(weight[:, perm], u, rounder, blocksize)
    return out[:, torch.argsort(perm)], loss


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | Handover, bits: int, *,
                  group_size: int | None = None, symmetric: bool = False,
                  act_order: bool = True, observer: str = "minmax",
                  mask: torch.Tensor | None = None, blocksize: int = 128,
                  damp: float = 0.01) -> GPTQResult:
    """GPTQ of ``weight`` (rows × d) for inputs of Hessian ``hessian`` (d × d).

    ``mask`` (True = keep) pins pruned weights at exactly 0 while the others compensate.
    A :class:`~netpress.reconstruct.obs.Handover` Hessian is consumed (freed before the
    sweep's factorization: one d x d float64 matrix fewer at the peak, the same codes).
    """
    g, groups = _layout(weight.shape[1], group_size)
    dynamic = group_size is not None and not act_order
    scale, zero = _grid(weight, g, bits, symmetric=symmetric,
                        observer=None if dynamic else observer)
    if dynamic:
        blocksize = g * max(1, blocksize // g)  # a group never straddles two blocks
    rounder = _Rounder(bits, symmetric, scale, zero, groups.to(weight.device), mask,
                       observer if dynamic else None, g)
    out, loss = _sweep(weight, hessian, rounder, act_order=act_order, blocksize=blocksize,
                       damp=damp)
    codes = _codes(out, scale, zero, groups, bits, symmetric)
    return GPTQResult(out, codes, scale, zero, loss)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
               zero_point: torch.Tensor | None = None, *, bits: int, symmetric: bool = True,
               group_size: int | None = None, act_order: bool = False,
               mask: torch.Tensor | None = None, blocksize: int = 128,
               damp: float = 0.01) -> torch.Tensor:
    """GPTQ rounding to a fixed grid: the integer codes of ``weight`` (rows × d).

    ``scale``/``zero_point`` are per row (shape ``rows``) or per group (``rows × groups``
    with ``group_size``); ``zero_point`` defaults to 0. Codes are int8 for symmetric
    grids, uint8 otherwise; dequantize them with the same scale. For a Conv weight pass
    ``weight.reshape(out_channels, -1)`` and the Hessian of its im2col inputs.
    """
    rows, cols = weight.shape
    g, groups = _layout(cols, group_size)
    s = scale.reshape(rows, -1).float()
    z = torch.zeros_like(s, dtype=torch.int32) if zero_point is None \
        else zero_point.reshape(rows, -1).to(torch.int32)
    if s.shape[1] != int(groups[-1]) + 1:
        raise ValueError(f"scale has {s.shape[1]} group(s) per row but {cols} columns in "
                         f"groups of {g} need {int(groups[-1]) + 1}")
    w = weight.double()
    rounder = _Rounder(bits, symmetric, s, z, groups.to(weight.device), mask, None, g)
    out, _ = _sweep(w, hessian.double(), rounder, act_order=act_order, blocksize=blocksize,
                    damp=damp)
    return _codes(out, s, z, groups, bits, symmetric)


def rtn_quantize(weight: torch.Tensor, bits: int, *, group_size: int | None = None,
                 symmetric: bool = False, observer: str = "minmax",
                 mask: torch.Tensor | None = None) -> GPTQResult:
    """Round to nearest on the same grids as :func:`gptq_quantize` (the baseline)."""
    g, groups = _layout(weight.shape[1], group_size)
    scale, zero = _grid(weight, g, bits, symmetric=symmetric, observer=observer)
    codes = _codes(weight, scale, zero, groups, bits, symmetric)
    if mask is not None:
        codes = torch.where(mask, codes, zero[:, groups].to(codes.dtype))
    deq = (codes.to(weight.dtype) - zero[:, groups].to(weight.dtype)) \
        * scale[:, groups].to(weight.dtype)
    return GPTQResult(deq, codes, scale, zero, torch.zeros(weight.shape[0], dtype=weight.dtype))
