"""Shrinkage of a layer's input Hessian toward its diagonal, for little calibration data.

``H = XᵀX / n`` estimated from ``n`` input rows of width ``d`` is noisy when ``n`` is not
much larger than ``d`` (rank-deficient when ``n < d``): the OBS updates of SparseGPT and
GPTQ then move weights along directions the calibration rows happen not to excite, which
costs output error on other inputs. Shrinking the correlations toward zero,

    H_α = (1 - α) H + α diag(H),

trades that variance for a bias (Ledoit & Wolf 2004; Schäfer & Strimmer 2005, target
"diagonal, unequal variances"). ``α = 0`` is the sample Hessian; ``α = 1`` keeps only the
inputs' energies, where SparseGPT's choice becomes Wanda's ``|w|·‖x‖`` with no update and
GPTQ becomes round to nearest. The shrinkage is scale-free: rescaling an input (and its
weight column inversely) leaves ``α`` and the fit unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["shrink_", "shrunk", "shrinkage_intensity"]


def shrink_(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - α) H + α diag(H)`` in place (the off-diagonal entries scaled by ``1 - α``);
    returns ``h``. ``h`` may be a batch of matrices (``... × d × d``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrinkage {alpha!r} must lie in [0, 1]")
    if alpha == 0.0:
        return h
    diag = torch.diagonal(h, dim1=-2, dim2=-1).clone()
    h.mul_(1.0 - alpha)
    torch.diagonal(h, dim1=-2, dim2=-1).copy_(diag)
    return h


def shrunk(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`shrink_` of a copy."""
    return shrink_(h.clone(), alpha)


def shrinkage_intensity(h: torch.Tensor, n: float) -> float:
    """The Ledoit-Wolf intensity ``α`` toward the diagonal for a second-moment matrix ``h``
    (d × d) averaged over ``n`` independent rows, in closed form from ``h`` and ``n``.

    For the correlations ``r_ij`` the shrunk estimate ``(1 - α) r_ij`` has the expected
    squared error ``(1 - α)² Var(r_ij) + α² ρ_ij²``, least at
    ``α* = Σ Var(r_ij) / Σ E[r_ij²]`` (over ``i ≠ j``). With Gaussian rows
    ``Var(r_ij) ≈ (1 - r_ij²)² / n`` and the plug-in ``E[r_ij²] ≈ r_ij²``:

        α = Σ_{i≠j} (1 - r_ij²)² / (n · Σ_{i≠j} r_ij²),   clipped to [0, 1].

    Inputs that never vary (zero diagonal) count as uncorrelated. ``d < 2`` gives 0.
    """
    d = h.shape[-1]
    if d < 2 or n <= 0:
        return 0.0 if d < 2 else 1.0
    h = h.double()
    diag = torch.diagonal(h).clamp_min(0)
    inv = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))
    r2 = (h * inv[:, None] * inv[None, :]).pow_(2).clamp_(max=1.0)
    r2.fill_diagonal_(0.0)
    signal = float(r2.sum())
    noise = float((1.0 - r2).pow_(2).sum()) - d  # the diagonal's d ones left out
    if signal <= 0.0:
        return 1.0
    return min(1.0, max(0.0, noise / (n * signal)))
