"""Mask refinement after a one-shot prune: pure functions on tensors.

A layer's rows ``w`` (rows × d) are to be replaced by sparse rows ``ŵ`` so the output error
``tr((ŵ - w) H (ŵ - w)ᵀ)`` on inputs of Hessian ``H`` is least. SparseGPT picks its mask in
one left-to-right sweep, block by block, and never revisits it. :func:`admm_prune`
(ALPS, Meng et al. 2024) starts from its result and runs the operator-splitting iteration of
``min ½ tr((ŵ - w) H (ŵ - w)ᵀ)  s.t.  ŵ = D, D sparse`` with scaled dual ``V``:
``ŵ ← (w H + ρ(D - V))(H + ρI)⁻¹``, ``D ← P_k(ŵ + V)``, ``V ← V + ŵ - D``, the penalty
``ρ`` growing geometrically so the support settles; ``P_k`` keeps the ``k`` largest
entries of the whole matrix (so rows may end with different counts). One
eigendecomposition of ``H`` turns every solve into two matrix products. The support of
``D`` is the new mask; the kept weights are then refitted exactly
(:func:`netpress.reconstruct.lstsq.masked_lstsq`).

:func:`masked_error` is the objective it is judged by. (Row-wise swaps in the manner of
DSnoT, tried on top of it on MiniLM, lowered the calibration error by a further 1.7% only:
not kept.)
"""

from __future__ import annotations

import torch

from netpress.reconstruct.obs import damped

__all__ = ["masked_error", "admm_prune", "topk_keep"]


def masked_error(w_hat: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((ŵ - w) H (ŵ - w)ᵀ)``: the layer's summed squared output error per sample."""
    diff = (w_hat - weight).double()
    return float(((diff @ hessian.double()) * diff).sum())


def topk_keep(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep-mask of the ``keep`` entries of largest magnitude (ties: lower index first)."""
    flat = values.reshape(-1).abs()
    if 0 < keep < flat.numel():  # the k-th largest as a threshold: linear time, no sort
        fast = flat >= torch.kthvalue(flat, flat.numel() - keep + 1).values
        if int(fast.sum()) == keep:
            return fast.reshape(values.shape)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    if keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        out[order[:keep]] = True
    return out.reshape(values.shape)


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, start: torch.Tensor, *,
               keep: int | None = None, damp: float = 0.01, iters: int = 60,
               rho: float = 0.02, growth: float = 1.15) -> torch.Tensor:
    """ALPS-style ADMM from the sparse weights ``start`` (rows × d); returns the keep mask
    with ``keep`` kept weights (default: as many as ``start`` has nonzeros).

    ``ρ`` is relative to the mean diagonal of the damped ``H`` and grows by ``growth`` per
    iteration (from ``rho``); the loop stops early once the support has not moved for five
    iterations with ``ρ`` past 1.
    """
    if start.shape != weight.shape or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"weight {tuple(weight.shape)}, start {tuple(start.shape)} and "
                         f"hessian {tuple(hessian.shape)} do not fit together")
    h = damped(hessian.double(), damp)
    h /= float(torch.diagonal(h).mean())
    evals, evecs = torch.linalg.eigh(h)
    w = weight.double()
    wh = w @ h
    keep = int((start != 0).sum()) if keep is None else keep
    d = start.double().clone()
    v = torch.zeros_like(d)
    mask = start != 0
    still = 0
    for _ in range(iters):
        w_hat = ((wh + rho * (d - v)) @ evecs) / (evals + rho)[None, :] @ evecs.T
        new_mask = topk_keep(w_hat + v, keep)
        d = torch.where(new_mask, w_hat + v, torch.zeros_like(d))
        v += w_hat - d
        still = still + 1 if bool(torch.equal(new_mask, mask)) else 0
        mask = new_mask
        if still >= 5 and rho > 1.0:
            break
        rho *= growth
    return mask
