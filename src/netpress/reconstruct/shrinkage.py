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

import math
import warnings
from typing import Any

import torch

from netpress.errors import RecipeError
from netpress.reconstruct.stats import LayerStats

__all__ = ["shrink_", "shrunk", "shrinkage_intensity", "intensity", "check_setting",
           "Shrinker"]


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
    diag = torch.diagonal(h).double().clamp_min(0)
    inv = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))
    signal = noise = 0.0
    for r0 in range(0, d, _ROWS):  # row blocks: no d x d temporary (75 MB at d = 3072)
        r1 = min(r0 + _ROWS, d)
        r2 = (h[r0:r1].double() * inv[r0:r1, None] * inv[None, :]).pow_(2).clamp_(max=1.0)
        r2[:, r0:r1].fill_diagonal_(0.0)
        signal += float(r2.sum())
        noise += float(r2.neg_().add_(1.0).pow_(2).sum()) - (r1 - r0)  # the diagonal's 1s
    if signal <= 0.0:
        return 1.0
    return min(1.0, max(0.0, noise / (n * signal)))


_ROWS = 256
_TINY = torch.finfo(torch.float32).tiny


def check_setting(owner: str, value: Any) -> None:
    """Refuse a ``shrinkage`` setting other than ``"auto"`` or a number in [0, 1]."""
    if value != "auto" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                            or not math.isfinite(value) or not 0 <= value <= 1):
        raise RecipeError(f"{owner}: shrinkage={value!r}; give 'auto' or a number in [0, 1] "
                          "(0: no shrinkage)")


def intensity(setting: float | str, h: torch.Tensor, n: float) -> float:
    """The ``α`` a ``shrinkage`` setting gives for the second-moment matrix ``h`` (d × d) of
    ``n`` rows: :func:`shrinkage_intensity` for ``"auto"``, the number itself otherwise;
    0 where the mean diagonal lies below float32's range (left as it is, for the solver to
    refuse it naming the layer)."""
    if float(torch.diagonal(h).mean()) < _TINY:
        return 0.0
    return shrinkage_intensity(h, n) if setting == "auto" else float(setting)


class Shrinker:
    """Shrinks each layer's statistics before its fit (an engine ``prepare``) and keeps
    what it did for the report: ``setting`` is ``"auto"`` (:func:`shrinkage_intensity` per
    layer and conv group) or a fixed ``α`` (0: nothing changes). The cross term ``M`` with
    the original model's inputs (square when the shapes match) becomes ``M - α·offdiag(H)``:
    ``M - H`` is unchanged, so a refit to the original outputs, ``W + W(M - H) H_α⁻¹``, is
    the same from the cross term as from the residual statistic ``W(M - H)``, and a layer
    whose inputs did not change refits to itself."""

    def __init__(self, setting: float | str) -> None:
        self.setting = setting
        self.alpha: dict[str, float] = {}
        self.rows: dict[str, tuple[int, int]] = {}  # layer -> (calibration rows, inputs)

    def __call__(self, names: list[str], stats: LayerStats) -> None:
        h = stats.hessian
        if h is None:
            return
        alphas = []
        for g in range(h.shape[0]):
            a = intensity(self.setting, h[g], stats.samples)
            cross = stats.cross
            if a > 0 and cross is not None and cross.shape[-2] == cross.shape[-1]:
                # M - α·offdiag(H): the difference M - H that a refit to the original
                # outputs reads stays as it was (as the residual statistic W(M - H) does)
                diag = torch.diagonal(h[g]).clone()
                cross[g].add_(h[g], alpha=-a)
                torch.diagonal(cross[g]).add_(diag, alpha=a)
            shrink_(h[g], a)
            alphas.append(a)
        self.record(names, max(alphas), stats.samples, h.shape[-1])

    def record(self, names: list[str], alpha: float, rows: int, inputs: int) -> None:
        """Note for the report that the layers ``names`` (``inputs`` wide, ``rows``
        calibration rows) were shrunk by ``alpha``."""
        for n in names:
            self.alpha[n] = round(alpha, 4)
            self.rows[n] = (rows, inputs)

    def summary(self) -> dict[str, Any]:
        """The report's entries: the shrinkage per layer and the fewest calibration rows per
        input column over the layers."""
        ratio = min((r / d for r, d in self.rows.values()), default=None)
        return {"shrinkage": dict(self.alpha),
                "min_rows_per_column": None if ratio is None else round(ratio, 3)}

    def warn(self, owner: str, advice: str = "") -> None:
        """Warn about the layers whose calibration rows are fewer than their inputs (with the
        method's own ``advice`` after the common one)."""
        few = {n: rd for n, rd in self.rows.items() if rd[0] < rd[1]}
        if not few:
            return
        name, (rows, d) = min(few.items(), key=lambda kv: kv[1][0] / kv[1][1])
        shrunk_by = f"shrunk by {self.alpha[name]:.2f}" if self.alpha[name] > 0 \
            else "not shrunk (shrinkage=0)"
        warnings.warn(f"{owner}: {len(few)} layer(s) saw fewer calibration rows than inputs, "
                      f"e.g. {name!r}: {rows} rows for {d} inputs; their input Hessians are "
                      f"rank-deficient ({shrunk_by}) and the fit may follow the calibration "
                      f"samples too closely. Give more calibration samples: "
                      f"{-(-d * 4 // max(rows, 1))}x as many would give that layer 4 rows "
                      f"per input{advice}", stacklevel=4)
