"""The refit's ridge chosen by cross-validation on the calibration rows (``damp="auto"``).

A least-squares refit ``argmin_Θ ‖X Θ − Y‖² + λ‖Θ − Θ₀‖²`` needs a ridge ``λ`` that depends
on how many rows the calibration data give per input column and on how far the data pull
from ``Θ₀`` (the kept columns of the original weights): on all-MiniLM-L6-v2 at 50% MACs the
refit's best single relative ridge is ~1 with 16-64 sentences and ~0.01 with 512
(BENCHMARKS.md, "Hessian shrinkage in the refits"), and the layers differ too. No fixed
value serves all, and a rule from the rows per column alone
(:func:`netpress.prune.fisher.few_rows_damp`) ignores the second factor.

Here the calibration inputs (sentences, images) are dealt into ``K`` folds in turn, all the
rows of one input in the same fold (its tokens are not independent rows), and the sums
``X̃_kᵀX̃_k`` and ``X̃_kᵀY_k`` are kept per fold. For every candidate ``λ`` the fit on all
folds but ``k`` is scored on fold ``k`` from its sums alone:

    ‖X_k Θ − Y_k‖² − ‖Y_k‖² = ⟨Θ, H_k Θ⟩ − 2⟨Θ, G_k⟩

(the ``‖Y_k‖²`` term does not depend on ``λ``, so it is never needed), with
``Θ(λ) = Θ₀ + (A + λI)⁻¹ (G − H Θ₀)``, ``A`` the (optionally shrunk) training sums, by one
Cholesky factorization per ``λ`` in a single work matrix (an eigendecomposition would give
the whole path at once, but costs about as much for ten candidates and needs several
``d x d`` matrices of workspace: the refit of a 3072-wide layer must stay within the memory
FisherPrune was measured at).

The candidates are *absolute* ridges ``λ = damp · mean(diag(H))`` of the full sums, used
unchanged in the folds: the ridge that balances noise against the pull of ``Θ₀`` is about the
same in absolute terms whatever the number of rows, so the relative ``damp`` chosen on
``(K − 1)/K`` of the rows is the one to use on all of them.

The callers (:func:`netpress.prune.refit.refit_blocks`,
:func:`netpress.prune.fisher.ridge_refit`) never go below the few-rows floor: held-out rows
drawn from the same few inputs cannot show the directions those inputs barely excite, where
a weak ridge puts large coefficients that new inputs then meet. On all-MiniLM-L6-v2 with 64
sentences the cross-validated choice alone gave 0.795 cosine (worst sentence 0.08), with the
floor 0.833 (0.18); the floor alone 0.767.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from netpress.reconstruct.shrinkage import shrink_

__all__ = ["DAMP_GRID", "FOLDS", "FoldSums", "ridge_path_errors", "cv_damp", "fold_fits"]

#: The relative ridges ``damp`` tried by :func:`cv_damp`: from nearly plain least squares to
#: nearly no refit at all (``Θ ≈ Θ₀``).
DAMP_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)

#: Folds of the cross-validation.
FOLDS = 2


class FoldSums:
    """Running ``X̃ᵀX̃`` and ``X̃ᵀY`` of ``folds`` parts of the rows: rows of input ``i``
    (their ``ids``) go to fold ``i mod folds``, so a fold holds whole inputs (sentences,
    images) and every fold sees every part of the calibration data; without ``ids`` each
    :meth:`add` splits its rows into ``folds`` consecutive chunks."""

    def __init__(self, folds: int = 2) -> None:
        if folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
        self.hessian: list[torch.Tensor | None] = [None] * folds
        self.xty: list[torch.Tensor | None] = [None] * folds
        self.rows = [0] * folds

    def add(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Rows ``x`` [n, d] (ones column included where the fit has a bias), their targets
        ``y`` [n, m] and the index of the input each row belongs to (``ids`` [n])."""
        x, y, k_all = x.double(), y.double(), len(self.rows)
        if ids is None:
            parts = list(zip(x.tensor_split(k_all), y.tensor_split(k_all)))
        else:
            fold = ids.reshape(-1).long().to(x.device) % k_all
            parts = [(x[fold == k], y[fold == k]) for k in range(k_all)]
        for k, (xk, yk) in enumerate(parts):
            if xk.shape[0] == 0:
                continue
            h, g = xk.T @ xk, xk.T @ yk
            h_old, g_old = self.hessian[k], self.xty[k]
            self.hessian[k] = h if h_old is None else h_old.add_(h)  # in place
            self.xty[k] = g if g_old is None else g_old.add_(g)
            del h
            self.rows[k] += int(xk.shape[0])

    def folds(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(H_k, G_k)`` of every fold that received rows."""
        return [(h, g) for h, g in zip(self.hessian, self.xty) if h is not None and g is not None]


def _training_sums(folds: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_{-k}, G_{-k})``: the sums of every fold but ``k`` (with two folds the other
    fold's own tensors, no copy: callers must not write them)."""
    others = [f for j, f in enumerate(folds) if j != k]
    h = others[0][0] if len(others) == 1 else sum(h for h, _ in others)
    g = others[0][1] if len(others) == 1 else sum(g for _, g in others)
    assert isinstance(h, torch.Tensor) and isinstance(g, torch.Tensor)
    return h, g


def ridge_path_errors(folds: Sequence[tuple[torch.Tensor, torch.Tensor]], theta0: torch.Tensor,
                      lambdas: Sequence[float], shrinkage: float = 0.0,
                      per_fold: bool = False) -> torch.Tensor:
    """For every absolute ridge ``λ`` in ``lambdas``: ``Σ_k ⟨Θ_k, H_k Θ_k⟩ − 2⟨Θ_k, G_k⟩``, where
    ``Θ_k = argmin ‖X_{-k} Θ − Y_{-k}‖² + λ‖Θ − Θ₀‖²`` is fitted on the other folds (its
    correlations shrunk toward the diagonal by ``shrinkage``, as
    :func:`netpress.prune.fisher.ridge_solve` solves), i.e. the held-out squared error up to
    a constant. ``folds``: ``(H_k, G_k)`` = ``(X_kᵀX_k, X_kᵀY_k)``; float64.

    Memory: one d x d work matrix besides the folds' sums (with two folds the training sums
    of one are the other's, no copy); a Cholesky factorization per ``λ`` and fold. A ``λ``
    whose system is not positive definite (rounding, near-empty folds) scores +inf.
    ``per_fold``: the errors of each held-out fold apart, ``[folds, len(lambdas)]``."""
    if len(folds) < 2:
        raise ValueError("cross-validation needs rows in at least 2 folds")
    theta0 = theta0.double().to(folds[0][0].device)
    errors = torch.zeros(len(folds), len(lambdas), dtype=torch.float64)
    work: torch.Tensor | None = None
    for k, (h_k, g_k) in enumerate(folds):
        h_train, g_train = _training_sums(folds, k)
        residual = g_train.double() - h_train.double() @ theta0
        for i, lam in enumerate(lambdas):
            work = h_train.double().clone() if work is None else work.copy_(h_train)
            if shrinkage > 0:
                shrink_(work, shrinkage)
            work.diagonal().add_(lam)
            _, info = torch.linalg.cholesky_ex(work, out=(work, torch.empty(
                (), dtype=torch.int32, device=work.device)))
            if int(info) != 0:
                errors[k, i] = float("inf")
                continue
            theta = theta0 + torch.cholesky_solve(residual, work)
            errors[k, i] = float((theta * (h_k.double() @ theta)).sum()
                                 - 2 * (theta * g_k.double()).sum())
    return errors if per_fold else errors.sum(0)


def cv_damp(folds: Sequence[tuple[torch.Tensor, torch.Tensor]], theta0: torch.Tensor,
            grid: Sequence[float] | None = None, shrinkage: float = 0.0) -> float:
    """The relative ridge ``damp`` of ``grid`` (``λ = damp · mean(diag(ΣH_k))``, as
    :func:`netpress.prune.fisher.ridge_solve` reads it) whose fits have the least held-out
    squared error over the folds (:func:`ridge_path_errors`); the larger on a tie.
    ``grid``: the candidates (None: :data:`DAMP_GRID`)."""
    grid = DAMP_GRID if grid is None else grid
    mean = sum(float(h.diagonal().double().mean()) for h, _ in folds)
    scale = mean if mean > 0 else 1.0
    errors = ridge_path_errors(folds, theta0, [d * scale for d in grid], shrinkage)
    best = float(errors.min())
    tol = 1e-9 * max(1.0, abs(best))
    return max(d for d, err in zip(grid, errors.tolist()) if err <= best + tol)


def fold_fits(folds: Sequence[tuple[torch.Tensor, torch.Tensor]], theta0: torch.Tensor,
              lam: float, shrinkage: float = 0.0) -> list[torch.Tensor]:
    """For every fold ``k``: ``Θ_k = Θ₀ + (A_k + λI)⁻¹ (G_{-k} − H_{-k} Θ₀)``, the fit on the
    other folds' sums with the absolute ridge ``lam`` (``A_k``: ``H_{-k}`` shrunk by
    ``shrinkage``), as :func:`ridge_path_errors` scores it; float64. What the refit guard
    (:mod:`netpress.prune.refit_guard`) runs on each fold's held-out inputs."""
    if len(folds) < 2:
        raise ValueError("fold fits need rows in at least 2 folds")
    theta0 = theta0.double().to(folds[0][0].device)
    fits = []
    for k in range(len(folds)):
        h_train, g_train = _training_sums(folds, k)
        work = h_train.double().clone()
        residual = g_train.double() - work @ theta0
        if shrinkage > 0:
            shrink_(work, shrinkage)
        work.diagonal().add_(lam)
        fits.append(theta0 + torch.linalg.solve(work, residual))
        del work, residual
    return fits
