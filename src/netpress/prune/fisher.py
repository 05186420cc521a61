"""Maths of post-training structured pruning (Kwon et al. 2022): pure functions on tensors.

* A *unit* (attention head, FFN neuron) owns some input columns of the layer that reads it
  (``o_proj`` for heads, ``down_proj`` for neurons). With a mask variable ``m_u`` scaling those
  columns, the per-sample gradient is ``∂ℓ_b/∂m_u = Σ_{c∈u} Σ_t x_btc g_btc`` (input times
  the gradient reaching that input), and the diagonal Fisher information of the mask is
  ``F_u = Σ_b (∂ℓ_b/∂m_u)²`` (:func:`column_mask_grads`, :func:`unit_fisher`). Removing unit
  ``u`` costs about ``F_u / 2`` in loss (second order, at a minimum).
* :func:`select_by_ratio` removes the units of least Fisher per MAC first until a cost
  budget is met, keeping a minimum per group (a greedy knapsack), then puts back the most
  valuable removed units that still fit under the budget.
* :func:`ridge_refit` refits the reading layer on calibration data: with the compressed
  model's inputs ``X_c`` (kept columns, plus a ones column for the bias) and the original
  model's outputs ``Y = X_o Wᵀ + b``, it solves
  ``min ‖X̃_c Θ - Y‖² + λ‖Θ - Θ₀‖²`` where ``Θ₀`` holds the kept columns and bias: least
  squares on the layer outputs, shrunk towards the original weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from netpress.prune.ridge_cv import FoldSums, cv_damp
from netpress.reconstruct.shrinkage import shrink_

__all__ = ["column_mask_grads", "unit_fisher", "select_by_ratio", "ridge_refit",
           "ridge_solve", "RefitStats", "ridge_affine", "few_rows_damp", "chosen_damp"]


def column_mask_grads(x: torch.Tensor, grad: torch.Tensor,
                      real: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample gradient of a column mask: ``[B, C]`` from input ``x`` and its gradient
    ``grad`` (both ``[B, ..., C]``); positions where ``real`` ([B, T]) is False count 0.

    Computed one sample at a time: the float64 products of a whole batch were 4 temporaries
    the size of a BERT FFN activation, in float64."""
    def one(b: int) -> torch.Tensor:
        prod = x[b].double() * grad[b].double()
        if real is not None and x.dim() == 3:
            prod = prod * real[b].to(prod.dtype).unsqueeze(-1)
        return prod.reshape(-1, prod.shape[-1]).sum(0)

    if x.shape[0] == 0:
        return torch.zeros(0, x.shape[-1], dtype=torch.float64, device=x.device)
    return torch.stack([one(b) for b in range(x.shape[0])])


def unit_fisher(col_grads: torch.Tensor, columns: Sequence[np.ndarray]) -> torch.Tensor:
    """``F_u = Σ_b (Σ_{c∈u} G[b, c])²`` for every unit (its columns in ``columns``)."""
    per_unit = torch.stack([col_grads[:, torch.from_numpy(np.asarray(c)).long()].sum(1)
                            for c in columns], dim=1)
    return per_unit.pow(2).sum(0)


def select_by_ratio(scores: Sequence[np.ndarray], costs: Sequence[float],
                    minimum: Sequence[int], over_budget: Callable[[np.ndarray], bool],
                    slack: Callable[[np.ndarray], float] | None = None,
                    ) -> list[np.ndarray]:
    """Boolean removal masks per group: units leave in order of ``score / cost`` (lowest
    first) while a group keeps at least ``minimum`` units, until ``over_budget(removed)``
    (removed: a concatenated mask over all groups) turns False. Binary search on the number
    removed; ``over_budget`` must be monotone in it.

    ``slack(removed)``: how far under the budget a removal lands (in the units of
    ``costs``). With it, units the prefix removed are put back (:func:`_refill`) while
    their costs fit in that slack: the last unit of the prefix can be a large one (a
    key/value group of heads) that takes the model well under the target, and smaller units
    (FFN neurons) removed before it then need not go."""
    order: list[tuple[float, int, int]] = []
    for g, (s, cost) in enumerate(zip(scores, costs)):
        ranked = np.argsort(s, kind="stable")
        removable = len(s) - minimum[g]
        for u in ranked[:max(0, removable)]:
            order.append((float(s[u]) / max(cost, 1e-30), g, int(u)))
    order.sort()
    offsets = np.cumsum([0, *[len(s) for s in scores]])

    def removed_of(n: int) -> np.ndarray:
        mask = np.zeros(int(offsets[-1]), dtype=bool)
        for _, g, u in order[:n]:
            mask[offsets[g] + u] = True
        return mask

    lo, hi = 0, len(order)
    if over_budget(removed_of(hi)):
        raise ValueError(f"the target cannot be met while every group keeps its minimum "
                         f"({len(order)} removable units)")
    while lo < hi:
        mid = (lo + hi) // 2
        if over_budget(removed_of(mid)):
            lo = mid + 1
        else:
            hi = mid
    final = removed_of(lo)
    if slack is not None:
        flat = [int(offsets[g] + u) for _, g, u in order]
        unit_cost = np.repeat(np.asarray(costs, dtype=np.float64), np.diff(offsets))
        final = _refill(final, [i for i in reversed(flat) if final[i]], unit_cost,
                        over_budget, slack)
    return [final[offsets[g]:offsets[g + 1]] for g in range(len(scores))]


def _refill(removed: np.ndarray, candidates: list[int], costs: np.ndarray,
            over_budget: Callable[[np.ndarray], bool],
            slack: Callable[[np.ndarray], float]) -> np.ndarray:
    """``removed`` with some of ``candidates`` (flat unit indices it removes, most valuable
    first) kept after all: each whose ``costs`` entry (per flat unit) fits in what is left of
    ``slack(removed)`` (a linear estimate), then the longest prefix of those the exact
    ``over_budget`` accepts (putting units back only adds cost: binary search)."""
    left = slack(removed)
    chosen = []
    for i in candidates:
        if costs[i] <= left:
            chosen.append(i)
            left -= float(costs[i])

    def with_back(n: int) -> np.ndarray:
        mask = removed.copy()
        mask[chosen[:n]] = False
        return mask

    lo, hi = 0, len(chosen)
    while lo < hi:  # the largest n that stays within the budget
        mid = (lo + hi + 1) // 2
        if over_budget(with_back(mid)):
            hi = mid - 1
        else:
            lo = mid
    return with_back(lo)


class RefitStats:
    """Running sums for :func:`ridge_refit`: ``X̃_cᵀX̃_c`` and ``X̃_cᵀX_o``; with ``folds``
    (for ``damp="auto"``) also per fold, each batch's rows split into that many consecutive
    chunks (rows come input by input)."""

    def __init__(self, folds: int = 0) -> None:
        self.hessian: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.rows = 0
        self.folds = FoldSums(folds) if folds else None

    def add(self, compressed: torch.Tensor, original: torch.Tensor) -> None:
        """Rows of the compressed layer's inputs and the original layer's inputs (same
        tokens, same order): ``[n, k]`` and ``[n, d]``."""
        xc = torch.cat([compressed.double(), compressed.new_ones(compressed.shape[0], 1,
                                                                 dtype=torch.float64)], 1)
        xo = torch.cat([original.double(), original.new_ones(original.shape[0], 1,
                                                             dtype=torch.float64)], 1)
        if self.folds is not None:
            self.folds.add(xc, xo)
        h, c = xc.T @ xc, xc.T @ xo
        self.hessian = h if self.hessian is None else self.hessian + h
        self.cross = c if self.cross is None else self.cross + c
        self.rows += int(compressed.shape[0])


def ridge_refit(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor,
                stats: RefitStats, damp: float | str = 0.01,
                shrinkage: float = 0.0,
                chosen: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight [out, k], bias [out])`` of a layer that now reads only the ``kept``
    input columns of ``weight`` ([out, d]), fitted to reproduce the original outputs.

    ``λ = damp * mean(diag(X̃_cᵀX̃_c))``, ``damp`` raised where the rows are few
    (:func:`few_rows_damp`, as the block refit does); ``"auto"``: the larger of that floor
    and the ridge chosen by cross-validation on the folds of ``stats``
    (:func:`netpress.prune.ridge_cv.cv_damp`). The bias is fitted too (zero if absent
    before). ``shrinkage``: as in :func:`ridge_solve`. ``chosen`` gets the ridge used.
    """
    if stats.hessian is None or stats.cross is None:
        raise ValueError("no calibration rows were collected")
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    full = torch.cat([w, b[:, None]], 1)                    # [out, d + 1]
    theta0 = torch.cat([w[:, kept], b[:, None]], 1).T      # [k + 1, out]
    damp = chosen_damp(damp, stats, theta0, full, shrinkage)
    if chosen is not None:
        chosen.append(damp)
    theta = ridge_solve(stats.hessian, stats.cross @ full.T, theta0, damp,  # X̃_cᵀ Y
                        shrinkage=shrinkage)
    return theta[:-1].T.to(weight.dtype), theta[-1].to(weight.dtype)


def chosen_damp(damp: float | str, stats: RefitStats, theta0: torch.Tensor,
                full: torch.Tensor, shrinkage: float = 0.0) -> float:
    """The relative ridge :func:`ridge_refit` uses: ``damp`` raised by :func:`few_rows_damp`;
    for ``"auto"`` the larger of that floor (from 0.01) and the cross-validated choice on
    the folds of ``stats`` (targets ``X_o fullᵀ``), where it kept folds with rows."""
    assert stats.hessian is not None
    inputs = stats.hessian.shape[0] - 1
    floor = few_rows_damp(0.01 if isinstance(damp, str) else damp, inputs, stats.rows)
    folds = stats.folds.folds() if stats.folds is not None else []
    if not isinstance(damp, str) or len(folds) < 2:
        return floor
    return max(floor, cv_damp([(h, g @ full.T) for h, g in folds], theta0,
                              shrinkage=shrinkage))


def few_rows_damp(damp: float, inputs: int, rows: int) -> float:
    """The refit's relative ridge for a fit of ``inputs`` columns from ``rows`` calibration
    rows: ``damp``, raised to ``(inputs / rows)²`` (at most 1) below ten rows per input;
    from ten rows per input up ``damp`` as given (the floor would be 0.01 or less there).

    A least-squares refit from few rows per input follows the calibration rows: on
    all-MiniLM-L6-v2 at 50% MACs with 16 sentences (0.65 rows per input at the fewest) the
    plain refit took the embedding cosine from 0.664 (the cut alone) to 0.327; with this
    floor 0.647, with 64 sentences 0.732 -> 0.767 (BENCHMARKS.md, "Hessian shrinkage in the
    refits", the lead's floor). With ten rows per input or more the floor is at most 0.01,
    the default ``damp``: plentiful data is fitted as before (512 sentences: 23.7 rows per
    input at the fewest, the same refit bit for bit)."""
    if rows <= 0:
        return max(damp, 1.0)
    if rows >= 10 * inputs:
        return damp
    return max(damp, min(1.0, (inputs / rows) ** 2))


def ridge_solve(hessian: torch.Tensor, xty: torch.Tensor, theta0: torch.Tensor,
                damp: float = 0.01, *, shrinkage: float = 0.0,
                overwrite: bool = False) -> torch.Tensor:
    """``argmin_Θ ‖X Θ - Y‖² + λ‖Θ - Θ₀‖²`` from ``hessian`` ``XᵀX`` and ``xty`` ``XᵀY``:
    ``(XᵀX + λI)⁻¹(XᵀY + λΘ₀)`` with ``λ = damp * mean(diag(XᵀX))`` (``damp`` itself when
    that mean is 0). Float64. ``overwrite=True`` (a caller done with a float64 ``hessian``)
    damps it in place: one d x d matrix fewer (75 MB for a 3072-wide layer).

    ``shrinkage`` ``α`` > 0 (:mod:`netpress.reconstruct.shrinkage`, for few rows per
    column): the correction to ``Θ₀`` is solved with the correlations of ``X`` shrunk toward
    zero, ``Θ₀ + ((1 - α) XᵀX + α diag(XᵀX) + λI)⁻¹ (XᵀY - XᵀX Θ₀)``: the residual the data
    show is kept, only the directions the rows happen to excite weigh less; ``Θ₀`` that
    fits the data exactly stays as it is. ``α = 0`` is the plain ridge above, bit for bit."""
    h = hessian.double()
    mean = float(h.diagonal().mean())
    lam = damp * mean if mean > 0 else damp
    if shrinkage > 0.0:
        theta0 = theta0.double()
        residual = xty.double() - h @ theta0  # before any in-place change of h
        a = h if overwrite and h is hessian else h.clone()
        shrink_(a, shrinkage).diagonal().add_(lam)
        return theta0 + torch.linalg.solve(a, residual)
    # H + λI without an identity matrix and its multiple (two d x d temporaries): + 0.0
    # everywhere (what λ·0 adds off the diagonal: -0.0 becomes +0.0), + λ on the diagonal
    a = h.add_(0.0) if overwrite and h is hessian else h.add(0.0)
    a.diagonal().add_(lam)
    return torch.linalg.solve(a, xty.double() + lam * theta0.double())


def ridge_affine(n: torch.Tensor, y: torch.Tensor, gain0: torch.Tensor, shift0: torch.Tensor,
                 damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(gain, shift)`` of a normalisation layer refitted to targets:
    ``argmin Σ_t (g_c n_tc + b_c - y_tc)² + λ((g_c - g0_c)² + (b_c - b0_c)²)`` for every
    channel ``c`` of ``n`` / ``y`` ([rows, C]: the normalised inputs and the targets), with
    ``λ = damp * mean_c Σ_t n_tc²``. Float64; a 2x2 solve per channel."""
    n, y = n.double(), y.double()
    s1, s2, count = n.sum(0), (n * n).sum(0), float(n.shape[0])
    lam = damp * float(s2.mean()) if float(s2.mean()) > 0 else damp
    a = torch.stack([torch.stack([s2 + lam, s1], -1),
                     torch.stack([s1, torch.full_like(s1, count + lam)], -1)], -2)
    rhs = torch.stack([(n * y).sum(0) + lam * gain0.double(),
                       y.sum(0) + lam * shift0.double()], -1)
    sol = torch.linalg.solve(a, rhs)
    return sol[:, 0], sol[:, 1]
