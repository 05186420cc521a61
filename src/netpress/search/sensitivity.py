"""Per-layer (or per-group) sensitivity to pruning and to weight quantization.

What the model's outputs do when only one layer (or one group of layers) is compressed: the
layer's weights are replaced in place by their magnitude-pruned or fake-quantized copy, the
model is run on a few batches, and the weights are restored, so the model is unchanged
afterwards. The error is the relative output error ``||f'(x) - f(x)||^2 / ||f(x)||^2``
(approximately additive over layers, which the knapsack allocator relies on) and the top-1
agreement with the unchanged model (per row of the last dimension for ``[B, T, D]`` outputs
such as a text model's hidden states or per-token logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from netpress.measure.collect import evaluating, outputs_on
from netpress.measure.fidelity import agreement as top1_agreement
from netpress.prune.masks import magnitude_mask
from netpress.quant.primitives import fake_quantize
from netpress.quant.ptq import weight_scale

__all__ = ["relative_error", "row_agreement", "prune_weight", "quantize_weight",
           "group_sensitivity"]


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``sum((approx - reference)^2) / sum(reference^2)`` (0 for identical outputs)."""
    den = float(reference.float().pow(2).sum())
    return float((approx.float() - reference.float()).pow(2).sum()) / max(den, 1e-30)


def row_agreement(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Top-1 agreement of the rows of the last dimension (``[N, C]`` as it is, ``[B, T, D]``
    as ``B * T`` rows)."""
    if reference.dim() > 2:
        reference = reference.reshape(-1, reference.shape[-1])
        approx = approx.reshape(-1, approx.shape[-1])
    return float(top1_agreement(reference, approx))


def prune_weight(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``w`` with its smallest-magnitude ``sparsity`` fraction set to zero."""
    return w * magnitude_mask(w, sparsity) if sparsity > 0 else w.clone()


def quantize_weight(w: torch.Tensor, bits: int, observer: str = "mse") -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of ``w`` (what WeightOnly stores)."""
    if bits >= 32:
        return w.clone()
    scale = weight_scale(w, bits, observer)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return fake_quantize(w.detach(), scale, zero, bits, symmetric=True, axis=0)


def group_sensitivity(model: nn.Module, inputs: Iterable[Any],
                      groups: Mapping[str, Sequence[str]], options: Sequence[Any],
                      transform: Callable[[torch.Tensor, Any], torch.Tensor],
                      advance: Callable[[], None] | None = None,
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {str(option): {"error": ..., "agreement": ...}}}`` with only that group's
    layers transformed by ``transform(weight, option)`` (e.g. :func:`prune_weight`);
    ``advance()`` is called after each probe (a progress bar's)."""
    batches = list(inputs)
    out: dict[str, dict[str, dict[str, float]]] = {}
    with evaluating(model):
        reference = outputs_on(model, batches)
        for g, layers in groups.items():
            weights: dict[str, torch.Tensor] = {}
            for n in layers:
                w = model.get_submodule(n).weight
                assert isinstance(w, torch.Tensor)
                weights[n] = w
            saved = {n: w.detach().clone() for n, w in weights.items()}
            out[g] = {}
            try:
                for opt in options:
                    with torch.no_grad():
                        for n, w in weights.items():
                            w.copy_(transform(saved[n], opt))
                    approx = outputs_on(model, batches)
                    out[g][str(opt)] = {"error": relative_error(reference, approx),
                                        "agreement": row_agreement(reference, approx)}
                    if advance is not None:
                        advance()
            finally:
                with torch.no_grad():
                    for n, w in weights.items():
                        w.copy_(saved[n])
    return out
