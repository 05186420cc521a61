"""SparseGPT and Wanda: which weights of a layer to prune, as pure functions on tensors.

SparseGPT (Frantar & Alistarh 2023) sweeps the columns left to right (:func:`obs_sweep`):
at the start of every block of columns it picks the block's mask adaptively from the OBS
saliency ``w² / [H⁻¹]_qq`` of the *current* (already compensated) weights, prunes, and
spreads each pruned weight's error over the columns to its right. With an ``N:M`` pattern
the choice is made per group of ``M`` columns instead. Wanda (Sun et al. 2024) scores
``|w| · ‖x‖₂`` per input and prunes without any update.
"""

from __future__ import annotations

import torch

from netpress.prune.masks import prune_count, smallest_mask
from netpress.reconstruct.obs import Handover, hinv_cholesky, obs_sweep
from netpress.reconstruct.patterns import nm_keep_mask, row_mask, split_count

__all__ = ["sparsegpt", "wanda_scores", "wanda_mask", "pattern_mask"]


class _MaskChooser:
    """The column callback of SparseGPT: chooses masks lazily and zeroes pruned weights."""

    def __init__(self, rows: int, cols: int, blocksize: int, *, count: int,
                 n_m: tuple[int, int] | None, mask: torch.Tensor | None,
                 device: torch.device) -> None:
        self.n_m, self.fixed = n_m, mask is not None
        self.keep = mask.clone() if mask is not None else torch.ones(
            rows, cols, dtype=torch.bool, device=device)
        sizes = [min(blocksize, cols - i) * rows for i in range(0, cols, blocksize)]
        self.block_counts = split_count(count, sizes)
        self.blocksize = blocksize

    def __call__(self, j: int, i: int, block: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        if not self.fixed:
            if self.n_m is not None:
                n, m = self.n_m
                if j % m == 0:
                    scores = block[:, i:i + m] ** 2 / diag[i:i + m] ** 2
                    self.keep[:, j:j + m] = nm_keep_mask(scores, n, m)
            elif i == 0:
                scores = block ** 2 / diag[None, :] ** 2
                k = self.block_counts[j // self.blocksize]
                self.keep[:, j:j + block.shape[1]] = smallest_mask(scores, k)
        return torch.where(self.keep[:, j], block[:, i], torch.zeros_like(block[:, i]))


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | Handover | None, *,
              sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
              mask: torch.Tensor | None = None, blocksize: int = 128, damp: float = 0.01,
              u: torch.Tensor | None = None, inplace: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (rows × d) so its outputs on inputs of Hessian ``hessian`` (d × d)
    change as little as possible; returns ``(pruned weights, keep mask)``.

    Unstructured: exactly ``round(sparsity · numel)`` weights are pruned, spread over the
    column blocks in proportion to their size and chosen per block. ``n_m=(N, M)`` keeps
    ``N`` of every ``M`` consecutive weights of each row instead (``d`` and ``blocksize``
    must be multiples of ``M``). A given ``mask`` (True = keep) is used as it is: only the
    compensating update is computed. A :class:`~netpress.reconstruct.obs.Handover` Hessian
    is consumed (:func:`~netpress.reconstruct.obs.hinv_cholesky`). ``u`` instead of the
    Hessian (None then) is that factor already computed (``hinv_cholesky(hessian, damp)``).
    ``inplace=True`` prunes ``weight`` itself (returned as the pruned weights).
    """
    if (hessian is None) == (u is None):
        raise ValueError("give either the Hessian or its factor u, not both")
    rows, cols = weight.shape
    if n_m is not None and (cols % n_m[1] or blocksize % n_m[1]):
        raise ValueError(f"{cols} columns (blocksize {blocksize}) are not a multiple of "
                         f"M={n_m[1]}")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    chooser = _MaskChooser(rows, cols, blocksize, count=prune_count(weight.numel(), sparsity),
                           n_m=n_m, mask=mask, device=weight.device)
    if u is None:
        assert hessian is not None
        u = hinv_cholesky(hessian, damp)
    pruned, _ = obs_sweep(weight, u, chooser, blocksize, inplace=inplace)
    return pruned, chooser.keep


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance ``|W_ij| · ‖X_j‖₂`` from the inputs' squared norms (``diag H``)."""
    return weight.abs() * sq_norms.clamp_min(0).sqrt()[None, :]


def pattern_mask(scores: torch.Tensor, *, sparsity: float,
                 n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask from scores: N:M per row group, or ``round(sparsity · numel)`` weights
    pruned evenly across the rows (Wanda's per-output comparison group)."""
    if n_m is not None:
        return nm_keep_mask(scores, *n_m)
    return row_mask(scores, prune_count(scores.numel(), sparsity))


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, *, sparsity: float = 0.5,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's keep-mask of ``weight`` (rows × d) given the inputs' squared norms (d)."""
    return pattern_mask(wanda_scores(weight, sq_norms), sparsity=sparsity, n_m=n_m)
