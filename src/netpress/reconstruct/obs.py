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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["damped", "hinv_cholesky", "obs_remove", "obs_sweep", "ColumnFn"]

#: ``compress(j, i, block, diag) -> column``: the compressed value of column ``j`` of the
#: layer (``i`` is its index in ``block``, the current weights of the columns of its block,
#: updated for every error so far; ``diag`` is the block's diagonal of ``U``).
ColumnFn = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` (``+ damp · I`` when H is all zero), a copy.

    The damping keeps the inverse finite when some inputs never vary (dead channels)."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    mean = float(diag.mean()) if diag.numel() else 0.0
    diag.add_(damp * (mean if mean > 0 else 1.0))
    return h


def hinv_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = Uᵀ U``).

    Raises ``torch.linalg.LinAlgError`` when the damped Hessian is not positive definite.
    """
    lower = torch.linalg.cholesky(damped(hessian, damp))
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


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
              blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the columns of ``weight`` (rows × d) left to right with OBS compensation.

    ``u`` is :func:`hinv_cholesky` of the layer's Hessian; ``compress`` returns each
    column's compressed values (see :data:`ColumnFn`). Returns the compressed weights
    (each column exactly what ``compress`` returned) and the per-row output error
    ``Σ_j (w_j - q_j)² / U_jj²`` the sweep accounted for.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize} must be >= 1")
    w = weight.clone()
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
