"""GPTQ rounding for ``Quantize``'s per-channel INT8 weights (``Quantize(rounding="gptq")``).

``Quantize`` fixes each layer's symmetric per-channel grid itself (its observer, its target
CPU's rules); only the rounding to that grid changes: :func:`netpress.reconstruct.gptq.
gptq_round` rounds column by column and lets the columns not yet rounded compensate, using
the Hessian of the layer's inputs as the prepared (BN-folded, activation-quantized) model
sees them on the calibration data. Grouped and depthwise convs keep round to nearest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from netpress.data import Data
from netpress.reconstruct.engine import collect_statistics
from netpress.reconstruct.gptq import gptq_round

__all__ = ["gptq_roundings"]

#: ``(float weight, per-channel scales, bits) -> integer codes``, as ``Quantize`` takes it
Rounding = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _rounding(hessian: torch.Tensor, damp: float) -> Rounding:
    def rnd(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        rows = weight.reshape(weight.shape[0], -1)
        codes = gptq_round(rows, hessian, scale.reshape(-1), bits=bits, symmetric=True,
                           damp=damp)
        return codes.reshape(weight.shape)
    return rnd


def gptq_roundings(model: nn.Module, names: Sequence[str], data: Data, *,
                   max_batches: int | None = None, damp: float = 0.01) -> dict[str, Rounding]:
    """A GPTQ rounding per layer of ``names`` (one-group layers only), from the Hessian of
    its inputs in ``model`` over ``data``."""
    plain = [n for n in names if getattr(model.get_submodule(n), "groups", 1) == 1]
    if not plain:
        return {}
    stats = collect_statistics(model, None, plain, data, mode="sequential-local",
                               max_batches=max_batches)
    out: dict[str, Rounding] = {}
    for name in plain:
        h = stats[name].hessian
        assert h is not None
        out[name] = _rounding(h[0], damp)
    return out
