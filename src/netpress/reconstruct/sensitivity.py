"""Per-layer sparsity from measured sensitivity at a fixed total: pure functions on tensors.

Pruning weight ``q`` of a layer alone, the others compensating optimally (OBS), costs
``w_q² / [H⁻¹]_qq`` of output error on the calibration inputs. Divided by the layer's output
energy ``tr(W H Wᵀ)`` this is a *relative* error, comparable across layers whose outputs
live on different scales (:func:`relative_saliency`). Pruning the ``k`` cheapest weights of
a layer then costs about the sum of its ``k`` smallest scores: an increasing, convex
function of ``k``. The allocation that minimises the summed relative error of all layers
for a fixed total count prunes the globally smallest scores, each layer within a box
around the target (:func:`sensitivity_counts`): convex separable costs under one linear
constraint are minimised by taking the cheapest marginal items first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from netpress.reconstruct.obs import damped

__all__ = ["relative_saliency", "sensitivity_counts"]


def relative_saliency(weight: torch.Tensor, hessian: torch.Tensor,
                      damp: float = 0.01) -> torch.Tensor:
    """``w_q² / [H⁻¹]_qq / tr(W H Wᵀ)`` for every weight of ``weight`` (rows × d) with inputs
    of Hessian ``hessian`` (d × d, ``E[x xᵀ]``; damped as the solvers damp it)."""
    w = weight.double()
    h = damped(hessian.double(), damp)
    hinv_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(h)))
    energy = float(torch.einsum("rd,de,re->", w, hessian.double(), w))
    return w.pow(2) / hinv_diag[None, :] / max(energy, 1e-30)


def sensitivity_counts(scores: Sequence[torch.Tensor], sparsity: float,
                       max_shift: float = 0.2) -> list[int]:
    """How many weights to prune per layer: ``round(sparsity · Σ n_l)`` in all, each layer's
    count within ``n_l · [sparsity - max_shift, sparsity + max_shift]`` (clipped to
    ``[0, n_l]``), chosen so the summed score of the pruned weights (each layer pruning its
    smallest) is least.

    ``scores`` are per layer, any shape (e.g. :func:`relative_saliency`). With equal
    score distributions the counts are (close to) uniform."""
    if not scores:
        raise ValueError("no layers to allocate over")
    if not 0.0 <= sparsity <= 1.0 or max_shift < 0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, 1] and max_shift={max_shift} "
                         "be >= 0")
    sizes = [s.numel() for s in scores]
    total = round(sparsity * sum(sizes))
    lo = [min(n, max(0, int(torch.tensor(n * (sparsity - max_shift)).ceil()))) for n in sizes]
    hi = [max(lo_, min(n, int(torch.tensor(n * (sparsity + max_shift)).floor())))
          for n, lo_ in zip(sizes, lo)]
    if not sum(lo) <= total <= sum(hi):
        raise ValueError(f"max_shift={max_shift} leaves no allocation of {total} weights")
    # the marginal items a layer may add beyond its minimum, cheapest first (prefix order
    # within a layer holds because each layer's scores are taken sorted)
    values, owner = [], []
    for k, s in enumerate(scores):
        ordered = s.detach().double().flatten().sort().values
        values.append(ordered[lo[k]:hi[k]])
        owner.append(torch.full((hi[k] - lo[k],), k, dtype=torch.long))
    extra = total - sum(lo)
    pick = torch.cat(values).argsort(stable=True)[:extra]
    counts = torch.bincount(torch.cat(owner)[pick], minlength=len(scores))
    return [lo[k] + int(counts[k]) for k in range(len(scores))]
