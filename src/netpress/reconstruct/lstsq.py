"""Least-squares refits of a layer's weights from its input statistics: pure maths.

With ``H = X_cᵀX_c / n`` (the inputs the layer now sees) and ``M = X_oᵀX_c / n`` (the
inputs it saw in the original model against those it now sees):

* :func:`refit_target` solves ``min_W' ‖X_c W'ᵀ - X_o Wᵀ‖²``: the dense weights that map the
  compressed model's inputs to the original model's outputs, ``W' = W M H⁻¹``. It is written
  ``W + W (M - H)(H + λI)⁻¹`` so the ridge ``λ`` shrinks the *correction*, not the weights,
  and identical inputs give back ``W`` exactly.
* :func:`masked_lstsq` refits the kept weights of each row under a mask: the ridge
  regression ``min (ŵ - w)(H + λI)(ŵ - w)ᵀ`` with ``ŵ = 0`` off the mask, whose solution is
  ``ŵ_S = (w H)_S H_SS⁻¹`` (``S`` the kept columns).
"""

from __future__ import annotations

import torch

from netpress.reconstruct.obs import damped

__all__ = ["refit_target", "masked_lstsq"]


def refit_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                 damp: float = 0.01) -> torch.Tensor:
    """``W + W (M - H)(H + λI)⁻¹`` for ``weight`` W (rows × d), ``hessian`` H, ``cross`` M."""
    if cross.shape != hessian.shape:
        raise ValueError(f"cross {tuple(cross.shape)} and hessian {tuple(hessian.shape)} "
                         "differ in shape")
    lower = torch.linalg.cholesky(damped(hessian, damp))
    # (H+λI) is symmetric: solve (H+λI) Δᵀ = (M - H)ᵀ Wᵀ
    delta_t = torch.cholesky_solve((cross - hessian).T @ weight.T, lower)
    return weight + delta_t.T


def masked_lstsq(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                 damp: float = 0.01) -> torch.Tensor:
    """Refit the kept weights of each row of ``weight`` (rows × d) under ``mask`` (True =
    keep) so the layer's outputs on inputs of Hessian ``hessian`` move least.

    Rows sharing a mask are solved together; pruned weights come back exactly 0.
    """
    h = damped(hessian, damp)
    out = torch.zeros_like(weight)
    patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
    for k in range(patterns.shape[0]):
        keep = patterns[k]
        rows = torch.nonzero(inverse == k).flatten()
        if not bool(keep.any()):
            continue
        w = weight[rows]
        rhs = (w @ h)[:, keep]   # w_S H_SS + w_P H_PS
        lower = torch.linalg.cholesky(h[keep][:, keep])
        out[rows[:, None], torch.nonzero(keep).flatten()[None, :]] = \
            torch.cholesky_solve(rhs.T, lower).T
    return out
