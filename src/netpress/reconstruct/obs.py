"""Optimal Brain Surgeon on a layer's input Hessian: pure functions on tensors.

A layer ``y = W x`` is judged by its output error on calibration inputs ``X`` (one sample
per row): for a change ``dW`` of one output row ``w`` the error is ``dw H dwᵀ`` with
``H = XᵀX / n``. Removing (or rounding) weight ``q`` of a row and letting the others
compensate optimally costs ``(w_q - v)² / [H⁻¹]_qq`` and moves the row by
``-(w_q - v) / [H⁻¹]_qq · H⁻¹[q, :]`` (Hassibi & Stork's OBS).

:func:`obs_sweep` applies this column by column from left to right, as SparseGPT and GPTQ do
(Frantar & Alistarh 2022/2023): column ``j`` is compressed, its error is spread over the
columns right of it only, and the inverse Hessian of the remaining columns is read from one
upper Cholesky factor ``U`` of ``H⁻¹`` (row ``j`` of ``U`` is that inverse's first row,
scaled by ``1/sqrt``). Updates to later blocks of columns are batched ("lazy batch updates").

Group OBS (for structured pruning): removing a whole *unit*, a set ``S`` of columns (a
channel's kernel positions, a head's dims), and letting the other columns compensate
optimally costs ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` (:func:`unit_removal_costs`) and moves the
weights by ``-W_S [H⁻¹]_SS⁻¹ H⁻¹[S, :]`` (:func:`remove_unit`). :func:`greedy_unit_order`
removes the cheapest unit, updates, and repeats, over several layers that read the same
units (a unit's cost is the sum over its readers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Handover", "read", "damped", "hinv_cholesky", "damped_lower_", "inverse_upper_",
           "obs_remove", "obs_sweep", "ColumnFn", "unit_removal_costs", "remove_unit",
           "greedy_unit_order", "UnitLayer"]

#: ``compress(j, i, block, diag) -> column``: the compressed value of column ``j`` of the
#: layer (``i`` is its index in ``block``, the current weights of the columns of its block,
#: updated for every error so far; ``diag`` is the block's diagonal of ``U``).
ColumnFn = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` (``+ damp · I`` when H is all zero), a copy.

    The damping keeps the inverse finite when some inputs never vary (dead channels)."""
    return _damp_(hessian.clone(), damp)


def _damp_(h: torch.Tensor, damp: float) -> torch.Tensor:
    diag = torch.diagonal(h)
    mean = float(diag.mean()) if diag.numel() else 0.0
    diag.add_(damp * (mean if mean > 0 else 1.0))
    return h


class Handover:
    """A matrix handed to a function that may consume it: change it in place and free it
    as soon as it has used it. The giver keeps no reference of its own (only the handover
    holds it), so the matrix's memory goes when the function drops it, not when the
    giver's frame ends. :meth:`peek` reads it; :meth:`take` moves it out (once)."""

    __slots__ = ("_t",)

    def __init__(self, t: torch.Tensor) -> None:
        self._t: torch.Tensor | None = t

    def peek(self) -> torch.Tensor:
        if self._t is None:
            raise RuntimeError("this handed-over matrix was already taken")
        return self._t

    def take(self) -> torch.Tensor:
        t = self.peek()
        self._t = None
        return t


def read(m: torch.Tensor | Handover) -> torch.Tensor:
    """The matrix itself, whether given plainly or handed over (not taken)."""
    return m.peek() if isinstance(m, Handover) else m


def hinv_cholesky(hessian: torch.Tensor | Handover, damp: float = 0.01, *,
                  perm: torch.Tensor | None = None) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = Uᵀ U``); with ``perm``, of
    ``H`` with its rows and columns permuted (``H[perm][:, perm]``, damped in that copy).

    A :class:`Handover` Hessian is consumed (damped and factored in its own storage, or freed
    once permuted). Either way the factorizations run in one d x d buffer
    (:func:`damped_lower_`, :func:`inverse_upper_`): besides a given Hessian, one d x d
    float64 matrix at the peak instead of two, the same factor bit for bit. Raises
    ``torch.linalg.LinAlgError`` when the damped Hessian is not positive definite.
    """
    if isinstance(hessian, Handover):
        if perm is not None:
            h = hessian.take()[perm]  # the Hessian itself goes here (its last reference)
            h = h[:, perm]
            hessian = Handover(h)
            del h
        return inverse_upper_(damped_lower_(hessian, damp))
    return inverse_upper_(_lower_(hessian.clone() if perm is None else hessian[perm][:, perm],
                                  damp))


def _mirror_lower_(h: torch.Tensor, block: int = 256) -> None:
    """Copy the strict lower triangle of ``h`` onto its upper one, in place (row blocks: no
    d x d temporary). The factorizations below read the lower triangle through a transposed
    view, which is then the upper one: mirrored, they read what the copying versions read."""
    d = h.shape[0]
    for r0 in range(0, d, block):
        r1 = min(r0 + block, d)
        h[r0:r1, r1:] = h[r1:, r0:r1].T
        diag = h[r0:r1, r0:r1]
        diag.copy_(diag.tril() + diag.tril(-1).T)


def _check_info(info: torch.Tensor, what: str) -> None:
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            f"{what}: the factorization could not be completed because the input is not "
            f"positive-definite (the leading minor of order {int(info)} is not "
            "positive-definite).")


def damped_lower_(hessian: Handover, damp: float = 0.01) -> torch.Tensor:
    """The lower Cholesky factor of ``H + damp · mean(diag H) · I`` in the handed-over
    Hessian's own storage (returned as a column-major view of it, the layout
    ``torch.linalg.cholesky`` returns): bit for bit ``cholesky(damped(H, damp))``, without a
    second d x d matrix. Raises ``torch.linalg.LinAlgError`` when not positive definite."""
    return _lower_(hessian.take(), damp)


def _lower_(h: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`damped_lower_` of a matrix this module owns."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"a square Hessian is needed, got {tuple(h.shape)}")
    h = h.contiguous()  # (a view of another layout is copied once)
    _damp_(h, damp)
    _mirror_lower_(h)
    a = h.mT  # column-major: LAPACK factors it where it is
    info = torch.empty(0, dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(a, out=(a, info))
    _check_info(info, "damped_lower_")
    return a


def inverse_upper_(lower: torch.Tensor) -> torch.Tensor:
    """``U`` with ``(L Lᵀ)⁻¹ = Uᵀ U`` (upper), computed in ``lower``'s own storage (a
    column-major view, as :func:`damped_lower_` returns): bit for bit
    ``cholesky(cholesky_inverse(lower), upper=True)``, without two more d x d matrices."""
    if not lower.mT.is_contiguous():
        raise ValueError("inverse_upper_ needs a column-major factor (damped_lower_'s)")
    torch.cholesky_inverse(lower, out=lower)
    info = torch.empty(0, dtype=torch.int32, device=lower.device)
    torch.linalg.cholesky_ex(lower, upper=True, out=(lower, info))
    _check_info(info, "inverse_upper_")
    return lower


def obs_remove(w: torch.Tensor, hinv: torch.Tensor, q: int,
               value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Set weight ``q`` of row ``w`` to ``value`` and compensate with the others (OBS).

    ``hinv`` is the inverse Hessian of the row's still-free weights. Returns the updated row
    (exactly ``value`` at ``q``), the inverse Hessian with ``q`` eliminated (its row and
    column become zero), and the output error the change costs, ``(w_q - value)² / hinv_qq``.
    """
    d = hinv[q, q]
    delta = w[q] - value
    new_w = w - (delta / d) * hinv[q]
    new_w[q] = value
    new_hinv = hinv - torch.outer(hinv[:, q], hinv[q]) / d
    return new_w, new_hinv, float(delta * delta / d)


def obs_sweep(weight: torch.Tensor, u: torch.Tensor, compress: ColumnFn,
              blocksize: int = 128, *, inplace: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the columns of ``weight`` (rows × d) left to right with OBS compensation.

    ``u`` is :func:`hinv_cholesky` of the layer's Hessian; ``compress`` returns each
    column's compressed values (see :data:`ColumnFn`). Returns the compressed weights
    (each column exactly what ``compress`` returned) and the per-row output error
    ``Σ_j (w_j - q_j)² / U_jj²`` the sweep accounted for. ``inplace=True`` compresses
    ``weight`` itself (returned), for a caller that has no further use of it.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize} must be >= 1")
    w = weight if inplace else weight.clone()
    rows, cols = w.shape
    losses = torch.zeros(rows, dtype=w.dtype, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        diag = torch.diagonal(u1)
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            q = compress(i1 + i, i, block, diag)
            err = (block[:, i] - q) / diag[i]
            losses += err * err
            block[:, i:] -= err[:, None] * u1[i, i:][None, :]
            block[:, i] = q
            errors[:, i] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return w, losses


#: one layer reading a group's units: ``(weight rows × d, inverse Hessian d × d, the matrix
#: columns of each unit)``
UnitLayer = tuple[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]]


def unit_removal_costs(weight: torch.Tensor, hinv: torch.Tensor,
                       units: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` for each unit's columns ``S``: the output error of
    removing that unit alone, the other columns compensating optimally."""
    out = torch.empty(len(units), dtype=weight.dtype, device=weight.device)
    by_size: dict[int, list[int]] = {}
    for i, cols in enumerate(units):
        by_size.setdefault(len(cols), []).append(i)
    for k, which in by_size.items():
        if k == 0:
            out[which] = 0.0
            continue
        idx = torch.stack([units[i].long() for i in which])              # n × k
        block = hinv[idx[:, :, None], idx[:, None, :]]                    # n × k × k
        ws = weight[:, idx].permute(1, 0, 2)                              # n × rows × k
        sol = torch.linalg.solve(block, ws.transpose(1, 2))               # n × k × rows
        out[which] = (ws * sol.transpose(1, 2)).sum((1, 2))
    return out


def remove_unit(weight: torch.Tensor, hinv: torch.Tensor,
                cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the columns ``cols`` of ``weight`` and compensate with the others (block OBS);
    returns the new weights and the inverse Hessian of the remaining columns (the removed
    rows and columns become zero)."""
    cols = cols.long()
    if cols.numel() == 0:
        return weight, hinv
    block = hinv[cols][:, cols]
    rows_s = hinv[cols]                                                   # k × d
    new_w = weight - weight[:, cols] @ torch.linalg.solve(block, rows_s)
    new_w[:, cols] = 0.0
    new_hinv = hinv - rows_s.T @ torch.linalg.solve(block, rows_s)
    new_hinv[cols] = 0.0
    new_hinv[:, cols] = 0.0
    return new_w, new_hinv


def greedy_unit_order(layers: Sequence[UnitLayer], count: int | None = None,
                      chunk: int = 1) -> tuple[list[int], list[float]]:
    """Remove units cheapest first (its cost summed over ``layers``), each removal
    compensated before the next is chosen. Returns the order of removal and the output
    error each removal added; their running sum is the error of removing that prefix
    together (the exact least-squares optimum for that set).

    ``count``: stop after that many units (default: all of them). ``chunk``: remove the
    ``chunk`` cheapest units at once before updating (each costed as if removed alone; the
    error added is then that of the chunk together), for wide layers whose one-by-one
    updates of a ``d × d`` inverse Hessian cost ``O(count · d²)``; ``chunk=1`` is the exact
    greedy order."""
    total_units = len(layers[0][2]) if layers else 0
    if any(len(units) != total_units for _, _, units in layers):
        raise ValueError("every layer must list the columns of the same units")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    stop = total_units if count is None else max(0, min(count, total_units))
    state = [(w.clone(), h.clone()) for w, h, _ in layers]
    alive = list(range(total_units))
    order: list[int] = []
    added: list[float] = []
    while len(order) < stop:
        total = torch.zeros(len(alive), dtype=torch.float64)
        for (w, h), (_, _, units) in zip(state, layers):
            total += unit_removal_costs(w, h, [units[u] for u in alive]).double().cpu()
        take = min(chunk, stop - len(order))
        best = [int(i) for i in torch.argsort(total, stable=True)[:take]]
        picked = [alive[i] for i in best]
        for i in sorted(best, reverse=True):
            alive.pop(i)
        if take == 1:
            added.append(max(0.0, float(total[best[0]])))
        else:  # the chunk's joint cost, in the layers' state before it
            joint = 0.0
            for (w, h), (_, _, units) in zip(state, layers):
                cols = torch.cat([units[u].long() for u in picked])
                joint += float(unit_removal_costs(w, h, [cols])[0])
            added.extend([max(0.0, joint) / take] * take)
        order.extend(picked)
        state = [remove_unit(w, h, torch.cat([units[u].long() for u in picked]))
                 for (w, h), (_, _, units) in zip(state, layers)]
    return order, added
