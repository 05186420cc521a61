"""A held-out check of each block's refit: the block output decides, not each layer's own.

The block refit (:func:`netpress.prune.refit.refit_blocks`) fits each group of a block on all
calibration rows; with ``damp="auto"`` every group's ridge is chosen by cross-validation of
that group's own outputs. That criterion cannot see what the block as a whole does on inputs
the fit has not seen: a group's held-out rows are inputs the earlier groups of the block were
fitted on (their errors there are in-sample), and a block whose groups each look better on
held-out rows can still produce worse outputs (Segformer's tiny random-weight model: the
refit's relative output error 0.0084 against 0.0057 for the cut alone).

Here each block's refit is checked on held-out inputs at the block's output. The refit gives
*candidates*: the groups' fits at their chosen ridges, and at those ridges times a few larger
factors (:data:`SCALES`); each candidate's fits on all folds but one are kept too
(:func:`netpress.prune.ridge_cv.fold_fits`; the same dealing as
:class:`netpress.prune.ridge_cv.FoldSums`: input ``i`` of a batch in fold ``i mod K``; the
LayerNorms' per-channel fits likewise). For every candidate the block runs on each fold's
inputs with the parameters fitted without that fold, and the squared error of its output
against the original block's output is summed; the block as the cut left it is scored on
the same rows. The block keeps the candidate with the least held-out error (its fit on all
rows), or gets its cut parameters back where none beats the cut.

The fold fits of a later group are solved on sums collected with the earlier groups at their
fit on all rows at the chosen ridge: the check is one pass over the data per candidate and
fold, not a refit of the block per fold and candidate.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from netpress.prune._blocks import BlockCalls

__all__ = ["SCALES", "BlockFits", "GuardVerdict", "snapshot", "restore", "held_out_error",
           "guard_block"]

#: The factors by which the guard's candidates multiply each group's cross-validated
#: relative ridge (capped at the grid's largest, :data:`netpress.prune.ridge_cv.DAMP_GRID`).
SCALES: tuple[float, ...] = (1.0,)

Values = dict[nn.Parameter, torch.Tensor]


def snapshot(block: nn.Module) -> Values:
    """The tensors every parameter of ``block`` holds now (no copy: the refits give the
    layers they fit new tensors, :func:`netpress._cow.assign_`, and never write these)."""
    return {p: p.data for p in block.parameters()}


def restore(values: Mapping[nn.Parameter, torch.Tensor]) -> None:
    """Give every parameter its tensor in ``values``."""
    with torch.no_grad():
        for p, t in values.items():
            p.data = t


@contextmanager
def _swapped(values: Mapping[nn.Parameter, torch.Tensor]) -> Iterator[None]:
    old = {p: p.data for p in values}
    restore(values)
    try:
        yield
    finally:
        restore(old)


def _cast(param: nn.Parameter, t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(param.device, param.dtype).reshape(param.shape).contiguous()


@dataclass
class BlockFits:
    """The refit's candidates for one block (see the module docs): per candidate, each
    refitted parameter's fit on all rows (``full``) and, per fold, its fit without that
    fold's rows (``folds``); per layer the relative ridge each candidate used (``ridges``).
    ``complete`` turns False where a group could not give them (a fold without rows): the
    guard then leaves the block's refit as it is."""

    folds: int
    scales: tuple[float, ...] = SCALES
    full: list[Values] = field(default_factory=list)
    fold_values: list[list[Values]] = field(default_factory=list)
    ridges: dict[str, list[float]] = field(default_factory=dict)
    complete: bool = True

    def __post_init__(self) -> None:
        self.full = [{} for _ in self.scales]
        self.fold_values = [[{} for _ in range(self.folds)] for _ in self.scales]

    def add(self, param: nn.Parameter, full: list[torch.Tensor],
            per_fold: list[list[torch.Tensor]]) -> None:
        """``param``'s fit on all rows per candidate, and per candidate its fits without each
        fold (cast to its dtype, device and shape)."""
        if len(per_fold) != len(self.scales) or any(len(f) != self.folds for f in per_fold):
            self.complete = False
            return
        for c, (value, fits) in enumerate(zip(full, per_fold)):
            self.full[c][param] = _cast(param, value)
            for k, t in enumerate(fits):
                self.fold_values[c][k][param] = _cast(param, t)


def _fold_of_rows(calls: BlockCalls, t: torch.Tensor, batch: int, folds: int) -> torch.Tensor:
    """The fold of every real-token row of ``t`` (``[B, ...]``), as :meth:`BlockCalls.rows`
    flattens it: input ``i`` of the batch in fold ``i mod folds``."""
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    ids = torch.arange(t.shape[0], device=t.device).reshape(shape).expand(*t.shape[:-1], 1)
    return calls.rows(ids, batch).reshape(-1) % folds


def held_out_error(block: nn.Module, index: int, calls: BlockCalls,
                   targets: list[torch.Tensor], per_fold: list[Values]) -> float | None:
    """The squared error of block ``index``'s outputs against ``targets`` (the original
    block's outputs, one per batch) over every real-token row, each row's output computed
    with the parameters ``per_fold[k]`` of its fold ``k`` (one entry: every row with it).
    None where the block's outputs are not shaped as the targets."""
    err = 0.0
    folds = len(per_fold)
    for b, target in enumerate(targets):
        want = calls.rows(target, b).double()
        fold = _fold_of_rows(calls, target, b, folds).to(want.device)
        for k, values in enumerate(per_fold):
            if k >= target.shape[0]:
                break
            with _swapped(values):
                got = calls.rows(calls.run(block, index, b), b).double()
            if got.shape != want.shape:
                return None
            err += float((got[fold == k] - want[fold == k]).pow(2).sum())
    return err


@dataclass
class GuardVerdict:
    """The guard's check of one block: the held-out squared error of its outputs with the
    cut parameters (``cut``) and with each candidate (``candidates``), and the candidate
    kept (its index; None: the cut)."""

    cut: float
    candidates: list[float]
    kept: int | None

    @property
    def ratio(self) -> float:
        """The kept refit's held-out error relative to the cut's (< 1: a refit kept); the
        best candidate's where the cut was kept (>= 1)."""
        best = self.candidates[self.kept] if self.kept is not None else min(self.candidates)
        return best / max(self.cut, 1e-300) if best > 0 else 0.0


def guard_block(block: nn.Module, index: int, calls: BlockCalls,
                targets: list[torch.Tensor], cut: Values,
                fits: BlockFits) -> GuardVerdict | None:
    """Check block ``index``'s refit candidates (see the module docs) and give the block the
    parameters of the one with the least held-out error, or its ``cut`` parameters where
    none has less than the cut; None (the refit left as it is) where ``fits`` is incomplete
    or empty."""
    if not fits.complete or not any(fits.full):
        return None
    err_cut = held_out_error(block, index, calls, targets, [cut])
    errors = [held_out_error(block, index, calls, targets, f) for f in fits.fold_values]
    if err_cut is None or any(e is None for e in errors):
        return None
    scores = [float(e) for e in errors if e is not None]
    best = min(range(len(scores)), key=lambda c: (scores[c], -fits.scales[c]))
    if scores[best] < err_cut:
        restore(fits.full[best])
        return GuardVerdict(err_cut, scores, best)
    restore(cut)
    return GuardVerdict(err_cut, scores, None)
