"""u8×s8 integer dot products as x86 CPUs without VNNI compute them, and how to avoid saturation.

ONNX Runtime multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``), on ARM64
and in the plain reference maths every product is added in 32 bits, exactly. On x86 CPUs with
AVX2 (or AVX-512 but no VNNI) the kernel uses ``vpmaddubsw``: the products of each adjacent
pair of the reduction dimension K, ``a[2j] * w[2j] + a[2j+1] * w[2j+1]``, are added into a
**16-bit integer with saturation**, and only then (``vpmaddwd``) widened to 32 bits. A pair of
large activations and large same-sign weights exceeds 32767 and is clipped, so the deployed
model computes something else than the fake-quant model.

This module is pure numpy/torch maths, tested against brute force:

* :func:`u8s8_matmul` emulates the kernel (``saturate=True``) or computes exactly;
* :func:`conv2d_u8s8` runs a whole convolution through it (channels-last im2col, the K order
  ONNX Runtime's ``QLinearConv`` uses on x86: kernel row, kernel column, input channel);
* :func:`kernel_rows` lays a weight out in that K order (:func:`from_kernel_rows` back);
  :func:`saturating_pairs` counts the pairs that can saturate for activations up to a code;
* :func:`pair_safe_scale` widens per-channel scales just enough that no same-sign pair of
  rounded codes can exceed :func:`pair_limit`, and :func:`limit_pairs` enforces that bound on
  codes from any rounding (a projection that leaves safe codes unchanged).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INT16_MIN", "INT16_MAX", "u8s8_matmul", "im2col_nhwc", "conv2d_u8s8",
           "is_depthwise", "kernel_rows", "from_kernel_rows", "pair_limit", "pair_sums",
           "saturating_pairs", "pair_safe_scale", "limit_pairs", "adjacent_pairs"]

INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1
_CHUNK = 1 << 16  # rows of A per float64 matmul (bounds the emulation's memory)


def _check_codes(a: np.ndarray, b: np.ndarray) -> None:
    if a.dtype != np.uint8 or b.dtype != np.int8:
        raise TypeError(f"u8s8_matmul takes uint8 activations and int8 weights (got {a.dtype} "
                        f"and {b.dtype})")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not multiply as (M, K) @ (K, N)")


def _risky_pairs(b: np.ndarray, max_code: int = 255) -> np.ndarray:
    """``(ceil(K / 2), N)``: whether pair ``j`` of column ``n`` can saturate."""
    w = b.astype(np.int64)
    if w.shape[0] % 2:
        w = np.pad(w, ((0, 1), (0, 0)))
    pos = np.maximum(w[0::2], 0) + np.maximum(w[1::2], 0)
    neg = np.maximum(-w[0::2], 0) + np.maximum(-w[1::2], 0)
    return (max_code * pos > INT16_MAX) | (-max_code * neg < INT16_MIN)


def u8s8_matmul(a: np.ndarray, b: np.ndarray, *, saturate: bool = True) -> np.ndarray:
    """``(M, K) uint8 @ (K, N) int8`` as int32, as an AVX2 ``vpmaddubsw`` kernel computes it.

    With ``saturate`` each adjacent pair ``(2j, 2j+1)`` of K is summed into int16 with
    saturation before the 32-bit accumulation (an odd K is padded with a zero); without it the
    result is the exact product (what VNNI and ARM64 kernels compute). The exact product comes
    from a float64 matmul (exact at these magnitudes); only pairs whose weights can saturate
    are then summed again and clipped.
    """
    _check_codes(a, b)
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.int64)
    bf = b.astype(np.float64)
    for i in range(0, a.shape[0], _CHUNK):
        out[i:i + _CHUNK] = a[i:i + _CHUNK].astype(np.float64) @ bf
    if saturate:
        a32 = a.astype(np.int64)
        w = b.astype(np.int64)
        risky = _risky_pairs(b)
        for j in np.flatnonzero(risky.any(1)):
            cols = np.flatnonzero(risky[j])
            pair = a32[:, 2 * j, None] * w[2 * j, cols]
            if 2 * j + 1 < w.shape[0]:
                pair += a32[:, 2 * j + 1, None] * w[2 * j + 1, cols]
            out[:, cols] += np.clip(pair, INT16_MIN, INT16_MAX) - pair
    return out.astype(np.int32)


def im2col_nhwc(x: np.ndarray, kernel: tuple[int, int], *, stride: tuple[int, int] = (1, 1),
                padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                pad_value: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Patches of ``x`` (N, C, H, W) as rows ``(N * OH * OW, kh * kw * C)``, channels last.

    Padding takes ``pad_value`` (an integer kernel pads with the input's zero point).
    Returns the rows and ``(OH, OW)``.
    """
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = [xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]          # each (N, C, OH, OW)
    cols = np.stack(taps, axis=1)                           # (N, kh*kw, C, OH, OW)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, kh * kw * c), (oh, ow)


def conv2d_u8s8(x: np.ndarray, w: np.ndarray, *, stride: tuple[int, int] = (1, 1),
                padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                groups: int = 1, pad_value: int = 0, saturate: bool = True) -> np.ndarray:
    """A uint8 × int8 convolution ``(N, C, H, W) * (O, C/groups, kh, kw)`` as int32 sums.

    Each group is one :func:`u8s8_matmul` over channels-last patches, the layout of ONNX
    Runtime's ``QLinearConv`` on x86. A depthwise convolution (one input and one output
    channel per group) never saturates: ONNX Runtime runs it with a kernel that adds in 32
    bits. Zero points are not subtracted (they do not change which pairs saturate).
    """
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"weight {w.shape} does not fit input {x.shape} with groups={groups}")
    og = o // groups
    saturate = saturate and not is_depthwise(cg, og)
    outs = []
    for g in range(groups):
        cols, (oh, ow) = im2col_nhwc(x[:, g * cg:(g + 1) * cg], (kh, kw), stride=stride,
                                     padding=padding, dilation=dilation, pad_value=pad_value)
        rows = kernel_rows(torch.from_numpy(w[g * og:(g + 1) * og])).numpy()
        outs.append(u8s8_matmul(cols, np.ascontiguousarray(rows.T), saturate=saturate))
    y = np.concatenate(outs, axis=1)                        # (N*OH*OW, O)
    return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def is_depthwise(in_per_group: int, out_per_group: int) -> bool:
    """Whether a conv with these channels per group runs on ONNX Runtime's depthwise kernel,
    which adds in 32 bits and so never saturates."""
    return in_per_group == 1 and out_per_group == 1


def kernel_rows(weight: torch.Tensor) -> torch.Tensor:
    """A weight (codes or floats) as ``(out_channels, K)`` in the K order x86 kernels read.

    A conv weight ``(O, C/groups, kh, kw)`` becomes ``(O, kh * kw * C/groups)`` channels last;
    a linear weight ``(O, I)`` is already in order.
    """
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(weight.shape[0], -1)


def from_kernel_rows(rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Invert :func:`kernel_rows`: rows back to a weight of ``shape``."""
    if len(shape) == 4:
        o, c, kh, kw = shape
        return rows.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(shape)


def pair_limit(max_code: int = 255) -> int:
    """The largest ``|w0| + |w1|`` of a same-sign weight pair that cannot saturate int16 when
    both activations are at most ``max_code`` (128 for uint8)."""
    return INT16_MAX // max_code


def adjacent_pairs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second members of each adjacent pair of the last dimension (the
    kernel's ``vpmaddubsw`` pairs), zero-padded to an even length."""
    if rows.shape[-1] % 2:
        rows = torch.nn.functional.pad(rows, (0, 1))
    return rows[..., 0::2], rows[..., 1::2]


def pair_sums(rows: torch.Tensor) -> torch.Tensor:
    """Per adjacent pair of each row: the larger of its positive and its negative part's
    magnitude, ``max(relu(w0) + relu(w1), relu(-w0) + relu(-w1))`` (what a pair of
    non-negative activations can amplify); shape ``(rows, ceil(K / 2))``."""
    a, b = adjacent_pairs(rows)
    return torch.maximum(a.clamp(min=0) + b.clamp(min=0), (-a).clamp(min=0) + (-b).clamp(min=0))


def saturating_pairs(rows: np.ndarray | torch.Tensor, max_code: int = 255) -> np.ndarray:
    """How many pairs of each row of integer codes (in kernel order) can saturate int16 for
    some activations in ``[0, max_code]``."""
    codes = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    return _risky_pairs(codes.T, max_code).sum(0)


def pair_safe_scale(rows: torch.Tensor, scale: torch.Tensor, limit: int) -> torch.Tensor:
    """Per-row scales, at least ``scale``, such that rounding ``rows / scale`` to the nearest
    integer keeps every same-sign pair's magnitude at or below ``limit``.

    The pairs' real magnitudes are brought to ``limit - 1`` at most: two roundings add less
    than one, so the codes' sum stays within ``limit``.
    """
    need = pair_sums(rows.detach().float()).amax(-1) / (limit - 1)
    return torch.maximum(scale, need.to(scale.dtype))


def limit_pairs(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """Integer codes (rows in kernel order) with every same-sign pair's magnitude cut to
    ``limit``: the excess is split between the two weights, the larger one giving the odd
    unit.
    Safe pairs are returned unchanged."""
    k = rows.shape[-1]
    a, b = (t.long() for t in adjacent_pairs(rows))
    mag_a, mag_b = a.abs(), b.abs()
    excess = torch.where(a * b > 0, (mag_a + mag_b - limit).clamp(min=0), 0)
    small_cut = torch.minimum(excess // 2, torch.minimum(mag_a, mag_b))
    a_big = mag_a >= mag_b
    cut_a = torch.where(a_big, excess - small_cut, small_cut)
    cut_b = excess - cut_a
    a, b = a - a.sign() * cut_a, b - b.sign() * cut_b
    out = torch.stack([a, b], dim=-1).reshape(*rows.shape[:-1], -1)[..., :k]
    return out.to(rows.dtype)
