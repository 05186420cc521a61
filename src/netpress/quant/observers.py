"""Observers: collect statistics of a tensor over calibration batches, then pick qparams.

Every observer has ``update(x)`` and ``qparams(bits, symmetric=..., signed=...)`` returning
``(scale, zero_point)`` (see :func:`~netpress.quant.primitives.choose_qparams`). The range
choices are pure functions (``percentile_range``, ``mse_range``, ``entropy_range``) that
the observers call on the values they kept, so they are tested on tiny tensors.

* ``minmax``: the running minimum and maximum (per tensor or per channel with ``axis``).
* ``moving_average``: exponential moving average of each batch's min and max.
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles of the values seen.
* ``mse``: the clipping range (a shrink of the min-max range) whose quantization error is
  smallest, searched over a grid.
* ``entropy``: TensorRT-style KL-divergence calibration on a histogram of ``|x|``.

Sample-based observers keep a deterministic strided subsample (at most ``max_samples``
values) so memory stays bounded on large calibration sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from netpress._inputs import real_tokens, token_mask
from netpress.quant.primitives import choose_qparams, fake_quantize, minmax

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "OBSERVERS",
    "make_observer",
    "percentile_range",
    "mse_range",
    "entropy_range",
    "calibration_batch",
    "observed_rows",
    "zero_padding",
]

#: The real-token mask of the calibration batch being run (:func:`calibration_batch`).
_REAL_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("netpress_real_tokens", default=None)


@contextmanager
def calibration_batch(inputs: Any) -> Iterator[None]:
    """While one calibration batch runs: observers see only its real tokens
    (:func:`observed_rows`). Padding positions are computed but never read by the model's
    output, so their activations do not belong in a range (batches padded to a fixed length
    can be mostly padding)."""
    reset = _REAL_TOKENS.set(token_mask(inputs))
    try:
        yield
    finally:
        _REAL_TOKENS.reset(reset)


def zero_padding(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the padding positions that ``keep`` (batch × tokens) marks False set to 0,
    when ``x`` is token-major (batch × tokens × ...); else ``x``. Unlike
    :func:`observed_rows` it keeps the shape, so per-sample sums stay per sample."""
    if keep is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(keep.shape):
        return x
    return x * keep.to(x.device, x.dtype).reshape(*keep.shape, *([1] * (x.dim() - 2)))


def observed_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` without the padding positions of the calibration batch being run, when it is a
    token-major activation of it (:func:`netpress._inputs.real_tokens`); else ``x``."""
    keep = _REAL_TOKENS.get()
    return x if keep is None else real_tokens(x, keep.to(x.device))

QParams = tuple[torch.Tensor, torch.Tensor]


class Observer:
    """Base class: tracks ``min_val``/``max_val`` (per tensor, or per channel of ``axis``)."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x.detach().float(), axis=self.axis)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    @property
    def seen(self) -> bool:
        return self.min_val is not None

    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val is None or self.max_val is None:
            raise RuntimeError(f"{type(self).__name__} has seen no data")
        return self.min_val, self.max_val

    def qparams(self, bits: int, *, symmetric: bool = False,
                signed: bool | None = None) -> QParams:
        lo, hi = self.range(bits, symmetric)
        return choose_qparams(lo, hi, bits, symmetric=symmetric, signed=signed)


class MinMaxObserver(Observer):
    """The running minimum and maximum."""


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min and max (``momentum`` weights new ones)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.1) -> None:
        super().__init__(axis)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x.detach().float(), axis=self.axis)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = self.min_val + m * (lo - self.min_val)
            self.max_val = self.max_val + m * (hi - self.max_val)


class _SampleObserver(Observer):
    """Keeps a bounded, deterministic subsample of the values (per tensor only)."""

    def __init__(self, axis: int | None = None, max_samples: int = 1 << 20) -> None:
        if axis is not None:
            raise ValueError(f"{type(self).__name__} is per tensor; use axis=None")
        super().__init__(None)
        self.max_samples = max_samples
        self._chunks: list[torch.Tensor] = []
        self._kept = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().float().reshape(-1)
        per_batch = max(1, self.max_samples // 16)
        if flat.numel() > per_batch:
            flat = flat[:: math.ceil(flat.numel() / per_batch)]
        self._chunks.append(flat.clone())
        self._kept += flat.numel()
        if self._kept > self.max_samples:  # thin everything out by half
            merged = torch.cat(self._chunks)[::2]
            self._chunks, self._kept = [merged], merged.numel()

    def samples(self) -> torch.Tensor:
        if not self._chunks:
            raise RuntimeError(f"{type(self).__name__} has seen no data")
        return torch.cat(self._chunks)


def percentile_range(values: torch.Tensor, percentile: float) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """The ``(100 - percentile)``-th and ``percentile``-th percentiles of ``values``."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r} must be in (50, 100]")
    v = values.reshape(-1).float()
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=v.dtype)
    if v.numel() > 1 << 24:  # torch.quantile's size limit
        v = v[:: math.ceil(v.numel() / (1 << 24))]
    lo, hi = torch.quantile(v, q)
    return lo, hi


class PercentileObserver(_SampleObserver):
    """Clip to the ``percentile``-th percentile (and its mirror at the low end)."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99,
                 max_samples: int = 1 << 20) -> None:
        super().__init__(axis, max_samples)
        self.percentile = percentile

    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return percentile_range(self.samples(), self.percentile)


def mse_range(x: torch.Tensor, bits: int, *, symmetric: bool, signed: bool | None = None,
              grid: int = 64, min_ratio: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range of 2-D ``x`` (rows are channels) minimising quantization MSE.

    Candidates shrink each row's min-max range by ratios in ``[min_ratio, 1]``; a 1-D ``x``
    is treated as one row. Returns ``(lo, hi)`` of shape ``(rows,)``.
    """
    rows = x.detach().float().reshape(1, -1) if x.dim() <= 1 else x.detach().float()
    lo0, hi0 = rows.amin(1), rows.amax(1)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for ratio in torch.linspace(min_ratio, 1.0, grid).tolist():
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = choose_qparams(lo, hi, bits, symmetric=symmetric, signed=signed)
        dq = fake_quantize(rows, scale, zp, bits, symmetric=symmetric, signed=signed, axis=0)
        err = (dq - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


class MSEObserver(_SampleObserver):
    """The clipping range with the smallest quantization MSE on the values seen."""

    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.samples()
        search = values[:: math.ceil(values.numel() / (1 << 16))]  # the grid search is costly
        lo, hi = mse_range(search, bits, symmetric=symmetric)
        # the subsample may miss the extremes: widen back to the observed range if unclipped
        lo = torch.where(lo <= search.min(), values.min(), lo)
        hi = torch.where(hi >= search.max(), values.max(), hi)
        return lo[0], hi[0]


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum()
    q = q / q.sum()
    keep = p > 0
    return float((p[keep] * torch.log(p[keep] / q[keep].clamp_min(1e-12))).sum())


def entropy_range(values: torch.Tensor, bits: int = 8, *, bins: int = 2048,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT's entropy calibration: the threshold ``t`` on ``|x|`` minimising KL(P || Q).

    ``P`` is the histogram of ``|x|`` clipped at ``t`` (outliers folded into the last bin),
    ``Q`` the same histogram quantized to ``2^(bits-1)`` levels (``2^bits`` for non-negative
    data). The zero bin is flattened to its neighbour's count first, as NVIDIA's
    pytorch-quantization does, so ReLU's exact zeros do not decide the range. Returns the
    original range clipped to ``[-t, t]``.
    """
    v = values.reshape(-1).float()
    lo, hi = v.amin(), v.amax()
    amax = float(v.abs().max())
    if amax == 0.0:
        return lo, hi
    hist = torch.histc(v.abs(), bins=bins, min=0.0, max=amax)
    hist[0] = hist[1]  # the spike of exact zeros (ReLU outputs) would drag the threshold down
    levels = 2 ** bits if float(lo) >= 0 else 2 ** (bits - 1)  # one-sided data: all levels
    best_t, best_kl = amax, float("inf")
    for i in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        # Q: merge the i bins into `levels` groups, spread each group's mass over its nonzero bins
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        mass = torch.zeros(levels).index_add_(0, idx, hist[:i])
        nonzero = torch.zeros(levels).index_add_(0, idx, (hist[:i] > 0).float())
        q = torch.where(hist[:i] > 0, mass[idx] / nonzero[idx].clamp_min(1), torch.zeros(i))
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_t = kl, (i + 0.5) * amax / bins
    t = torch.tensor(best_t)
    return torch.maximum(lo, -t), torch.minimum(hi, t)


class EntropyObserver(_SampleObserver):
    """KL-divergence (entropy) calibration on a histogram of the values seen."""

    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return entropy_range(self.samples(), bits)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, axis: int | None = None) -> Observer:
    """An observer by name (a key of :data:`OBSERVERS`)."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](axis=axis)

