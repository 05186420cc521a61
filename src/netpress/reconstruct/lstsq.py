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

from netpress.reconstruct.obs import Handover, _damp_, damped, read

__all__ = ["refit_target", "refit_with_lower", "refit_from_residual", "masked_lstsq",
           "with_bias", "corrected_bias"]


def refit_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor | Handover,
                 damp: float = 0.01, start: torch.Tensor | None = None) -> torch.Tensor:
    """``W + W (M - H)(H + λI)⁻¹`` for ``weight`` W (rows × d), ``hessian`` H, ``cross`` M.

    With ``start`` W₀ (rows × d_c, the layer's weights over the ``d_c`` inputs it now
    reads; ``cross`` is then d_o × d_c and ``weight`` rows × d_o):
    ``W₀ + (W M - W₀ H)(H + λI)⁻¹``. A :class:`~netpress.reconstruct.obs.Handover` M is
    consumed: ``M - H`` is formed in its storage, which is freed before the factorization
    (one d x d float64 matrix fewer at the peak, the same result bit for bit)."""
    if isinstance(cross, Handover) and start is None:
        return _refit_consuming(weight, hessian, cross, damp)
    cross = read(cross)
    d_c = hessian.shape[0]
    if hessian.shape != (d_c, d_c) or cross.shape[1] != d_c \
            or cross.shape[0] != weight.shape[1]:
        raise ValueError(f"cross {tuple(cross.shape)}, hessian {tuple(hessian.shape)} and "
                         f"weight {tuple(weight.shape)} do not fit together")
    if start is None and cross.shape[0] != d_c:
        raise ValueError(f"cross {tuple(cross.shape)} and hessian {tuple(hessian.shape)} "
                         "differ in shape: pass the layer's current weights as start=")
    if start is not None and start.shape != (weight.shape[0], d_c):
        raise ValueError(f"start {tuple(start.shape)} must be {(weight.shape[0], d_c)}")
    # the residual first, then the factor: one d x d temporary alive at a time besides H
    # and M (75 MB each for a 3072-wide layer)
    residual_t = (cross - hessian).T @ weight.T if start is None \
        else cross.T @ weight.T - hessian @ start.T
    lower = _damped_cholesky(hessian, damp)
    # (H+λI) is symmetric: solve (H+λI) Δᵀ = residualᵀ, as L Y = R then Lᵀ Δᵀ = Y (what
    # cholesky_solve computes, without its column-major copy of L: one d x d matrix fewer)
    y = torch.linalg.solve_triangular(lower, residual_t, upper=False)
    del residual_t
    delta_t = torch.linalg.solve_triangular(lower.mT, y, upper=True)
    return (weight if start is None else start) + delta_t.T


def _refit_consuming(weight: torch.Tensor, hessian: torch.Tensor, cross: Handover,
                     damp: float) -> torch.Tensor:
    _check(weight, hessian, cross.peek())
    m = cross.take()
    residual_t = m.sub_(hessian).T @ weight.T  # (M - H) in M's storage: no d x d temporary
    del m
    return refit_with_lower(weight, residual_t, _damped_cholesky(hessian, damp))


def refit_with_lower(weight: torch.Tensor, residual_t: torch.Tensor | Handover,
                     lower: torch.Tensor) -> torch.Tensor:
    """``W + R (H + λI)⁻¹`` from the residual ``Rᵀ`` (d × rows: ``((M - H) Wᵀ)`` of
    :func:`refit_target`, or the residual statistic ``E[W (x_o - x_c) x_cᵀ]`` transposed)
    and the lower Cholesky factor of ``H + λI`` (e.g.
    :func:`~netpress.reconstruct.obs.damped_lower_`, which may then go on to the sweep).
    A :class:`~netpress.reconstruct.obs.Handover` residual is freed once solved for."""
    r = read(residual_t)
    if r.shape != (lower.shape[0], weight.shape[0]) or weight.shape[1] != lower.shape[0]:
        raise ValueError(f"residual {tuple(r.shape)}, factor {tuple(lower.shape)} "
                         f"and weight {tuple(weight.shape)} do not fit together")
    del r
    # (H+λI) Δᵀ = Rᵀ as L Y = Rᵀ then Lᵀ Δᵀ = Y (cholesky_solve without its copy of L)
    y = torch.linalg.solve_triangular(lower, residual_t.take() if isinstance(
        residual_t, Handover) else residual_t, upper=False)
    delta = torch.linalg.solve_triangular(lower.mT, y, upper=True).T
    del y
    return delta.add_(weight)  # W + Δ, in Δ's storage (the same sums)


def refit_from_residual(weight: torch.Tensor, hessian: torch.Tensor, residual: torch.Tensor,
                        damp: float = 0.01) -> torch.Tensor:
    """:func:`refit_target` from the residual statistic ``R = E[W (x_o - x_c) x_cᵀ]``
    (rows × d, :attr:`~netpress.reconstruct.engine.LayerStats.residual`, which is
    ``W (M - H)``) instead of the cross term: ``W + R (H + λI)⁻¹``; ``hessian`` is left as
    it was."""
    return refit_with_lower(weight, residual.T, _damped_cholesky(hessian, damp))


def _check(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor) -> None:
    d = hessian.shape[0]
    if hessian.shape != (d, d) or cross.shape != (d, d) or weight.shape[1] != d:
        raise ValueError(f"cross {tuple(cross.shape)}, hessian {tuple(hessian.shape)} and "
                         f"weight {tuple(weight.shape)} do not fit together")


def _damped_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``cholesky(damped(hessian, damp))`` without the damped copy: the damping is added to
    ``hessian``'s diagonal in place and the saved diagonal written back afterwards, so the
    factor and ``hessian`` are bit-identical to the copying version."""
    diag = torch.diagonal(hessian)
    saved = diag.clone()
    try:
        return torch.linalg.cholesky(_damp_(hessian, damp))
    finally:
        diag.copy_(saved)


def with_bias(hessian: torch.Tensor, cross: torch.Tensor, mean: torch.Tensor,
              orig_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics of the inputs with a ones column appended: ``H̃`` (d_c+1)² and ``M̃``
    (d_o+1) × (d_c+1), from ``H``, ``M``, ``mean`` ``E[x_c]`` and ``orig_mean`` ``E[x_o]``.

    A weight matrix with its bias as the last column then maps the augmented inputs."""
    one = hessian.new_ones(1, 1)
    h = torch.cat([torch.cat([hessian, mean[:, None]], 1),
                   torch.cat([mean[None, :], one], 1)], 0)
    m = torch.cat([torch.cat([cross, orig_mean[:, None]], 1),
                   torch.cat([mean[None, :], one], 1)], 0)
    return h, m


def corrected_bias(weight: torch.Tensor, new_weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, orig_mean: torch.Tensor) -> torch.Tensor:
    """``b + W E[x_o] - W' E[x_c]``: the bias with which the layer's new weights ``W'`` on
    its current inputs (mean ``mean``) keep the mean output of the original weights ``W`` on
    the original inputs (mean ``orig_mean``); the least-squares optimal bias for fixed ``W'``."""
    return bias + weight @ orig_mean - new_weight @ mean


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
