"""R² range regularizers (Kundu et al., "R^2: Range Regularization for Model Compression and
Quantization", 2023) as pure functions of weight tensors, and a model-level sum.

Outlier weights stretch the quantization range of their layer; these terms pull the range in
during (pre-)training so the later quantization grid is finer:

* :func:`linf`: the largest magnitude, ``max |w|`` (only the extreme weight gets a gradient);
* :func:`margin`: every weight within ``width`` (a fraction of ``max |w|``) of the largest
  magnitude is pulled in, ``sum relu(|w| - (1 - width) * max |w|)`` (the edge detached);
* :func:`soft_min_max`: a smooth range ``smax(w) - smin(w)`` (softmax-weighted mean of ``w``
  at ``temperature``), which also handles asymmetric ranges.

:func:`range_penalty` sums one of them over a model's Conv/Linear weights; add
``strength * range_penalty(model, kind)`` to a recovery loss (see :func:`with_range_penalty`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["REGULARIZERS", "linf", "margin", "soft_min_max", "range_penalty",
           "with_range_penalty"]

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def linf(w: torch.Tensor) -> torch.Tensor:
    """``max |w|``."""
    return w.abs().max()


def margin(w: torch.Tensor, width: float = 0.1) -> torch.Tensor:
    """``sum relu(|w| - (1 - width) * max|w|)``: pulls in the whole top band, not one weight."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"margin width={width!r} must be in (0, 1]")
    a = w.abs()
    edge = (1.0 - width) * a.max().detach()  # a target, not differentiated: else the max rises
    return torch.relu(a - edge).sum()


def soft_min_max(w: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Smooth range: softmax-weighted max minus softmin-weighted min of ``w``."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    flat = w.reshape(-1)
    smax = (flat * torch.softmax(flat / temperature, 0)).sum()
    smin = (flat * torch.softmax(-flat / temperature, 0)).sum()
    return smax - smin


REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linf": linf, "margin": margin, "soft_min_max": soft_min_max}


def range_penalty(model: nn.Module, kind: str = "linf",
                  types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear),
                  ) -> torch.Tensor:
    """Sum of the ``kind`` regularizer over the weights of ``model``'s layers of ``types``."""
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown range regularizer {kind!r}; choose one of "
                         f"{sorted(REGULARIZERS)}")
    fn = REGULARIZERS[kind]
    weights = [getattr(m, "weight", None) for m in model.modules() if isinstance(m, types)]
    terms = [fn(w) for w in weights if isinstance(w, torch.Tensor)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def with_range_penalty(loss_fn: LossFn, model: nn.Module, kind: str,
                       strength: float) -> LossFn:
    """``loss_fn`` plus ``strength * range_penalty(model, kind)`` (a recovery-loop loss)."""
    def loss(out: torch.Tensor, teacher: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        return loss_fn(out, teacher, labels) + strength * range_penalty(model, kind).to(out)

    return loss
