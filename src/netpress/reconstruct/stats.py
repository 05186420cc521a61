"""A layer's input statistics and their running sums over the calibration inputs.

The sums are of float32 products promoted to float64 inside the add. The d x d products
(the Hessian ``XᵀX``, the cross term ``X_oᵀX_c``) are formed in column blocks, so their
float32 parts stay small (a whole one is 36 MB for a 3072-wide layer; the blocks hold the
same values). :class:`Residual` sums what a refit to the original outputs needs of the cross
term, ``W (X_o - X_c)ᵀ X_c``: rows × d instead of d × d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netpress.errors import DataError
from netpress.reconstruct.layers import LayerView

__all__ = ["LayerStats", "Accumulator", "Residual"]


@dataclass
class LayerStats:
    """Input statistics of one layer, averaged over ``samples`` input rows (im2col columns
    for convs), per conv group: ``hessian`` ``E[x xᵀ]`` (groups × d × d, float64; None when
    only ``sq_norms`` were asked for), ``sq_norms`` ``E[x²]`` (groups × d) and ``cross``
    ``E[x_orig x_compᵀ]`` (groups × d_orig × d; sequential mode only); ``mean`` ``E[x]``
    (groups × d) and ``orig_mean`` ``E[x_orig]`` (groups × d_orig; sequential mode only), for
    fits with a bias. ``residual`` ``E[W (x_orig - x_comp) x_compᵀ]`` (groups × rows × d, W
    the layer's weights when the statistics are taken) is what a refit to the original
    outputs needs of the cross term (``W (M - H)``), given instead of ``cross`` (and of
    ``orig_mean``, where the original model's forwards run ahead) when
    :func:`~netpress.reconstruct.engine.run_sequential` is asked for it: rows × d instead
    of d × d (a quarter for an FFN output layer).

    :func:`run_sequential` hands each fit its own object: a solver may set a field to None
    once it has used it, which frees that tensor as early as possible. The tensors may be
    shared with the other layers of a group: leave their values as they were, unless
    ``owned`` (this fit is their last reader: the solver may consume them, changing them
    in place, e.g. through :class:`~netpress.reconstruct.obs.Handover`)."""

    hessian: torch.Tensor | None
    sq_norms: torch.Tensor
    cross: torch.Tensor | None
    samples: int
    mean: torch.Tensor | None = None
    orig_mean: torch.Tensor | None = None
    owned: bool = False
    residual: torch.Tensor | None = None


#: float32 elements of a product's part (16 MiB): the d x d products are formed in column
#: blocks (a whole one is 36 MB for a 3072-wide layer; the blocks' values are the same)
_BLOCK = 1 << 22


def _add_product(total: torch.Tensor | None, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """``total + aᵀ b`` for ``a`` (groups × n × d_a) and ``b`` (groups × n × d_b), float32
    products promoted inside the add (the first part copied into a new float64 total, as
    ``part.double()``), in column blocks of ``b`` of at most :data:`_BLOCK` elements."""
    fresh = total is None
    if total is None:
        total = torch.empty(a.shape[0], a.shape[2], b.shape[2], dtype=torch.float64,
                            device=a.device)
    step = max(1, _BLOCK // max(1, a.shape[2]))
    at = a.transpose(1, 2)
    for j in range(0, b.shape[2], step):
        part = at @ b[:, :, j:j + step]
        if fresh:
            total[:, :, j:j + step].copy_(part)
        else:
            total[:, :, j:j + step].add_(part)
        del part
    return total


def _add_sq(total: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """``total + Σ_n cols²`` (groups × d), squared in column blocks (no n × d temporary)."""
    step = max(1, _BLOCK // max(1, cols.shape[1]))
    parts = [cols[:, :, j:j + step].pow(2).sum(1) for j in range(0, cols.shape[2], step)]
    part = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return part.double() if total is None else total.add_(part)


class Accumulator:
    """Running sums of one layer's input statistics (:class:`LayerStats` before the mean)."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.h: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.orig_sum: torch.Tensor | None = None
        self.n = 0

    @staticmethod
    def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        # in place, float32 parts promoted inside the add: the same sums as ``total +
        # part.double()`` without a float64 temporary or a second total (75 MB each for a
        # 3072-wide layer)
        return part.double() if total is None else total.add_(part)

    def add(self, cols: torch.Tensor, orig: torch.Tensor | None, *, cross: bool = True) -> None:
        """``cols`` (groups × n × d) of the compressed inputs, ``orig`` of the original ones
        (``cross=False``: their mean only)."""
        self.n += cols.shape[1]
        self.sq = _add_sq(self.sq, cols)
        self.sum = self._add(self.sum, cols.sum(1))
        if self.full:
            self.h = _add_product(self.h, cols, cols)
        if orig is not None:
            if cross:
                self.cross = _add_product(self.cross, orig, cols)
            self.orig_sum = self._add(self.orig_sum, orig.sum(1))

    def stats(self) -> LayerStats:
        """The averages, computed in place: the accumulator hands its sums over and is
        empty afterwards (no second copy of a Hessian)."""
        if self.sq is None or self.n == 0:
            raise DataError("the calibration data never reached this layer")
        n = float(self.n)

        def mean(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.div_(n)

        out = LayerStats(mean(self.h), self.sq.div_(n), mean(self.cross), self.n,
                         mean(self.sum), mean(self.orig_sum))
        self.h = self.sq = self.cross = self.sum = self.orig_sum = None
        return out


class Residual:
    """``Σ W (x_o - x_c) x_cᵀ`` of one layer (:attr:`LayerStats.residual` before the mean),
    from its weights now: ``W x`` in float32, as the layer computes it, then the outer
    products as the other sums. Equal inputs give exactly zero."""

    def __init__(self, view: LayerView) -> None:
        self.wt = view.matrix(torch.float32).transpose(1, 2)  # groups × d × rows
        self.total: torch.Tensor | None = None

    def _step(self) -> int:
        return max(1, _BLOCK // max(1, self.wt.shape[2]))

    def outputs(self, orig: torch.Tensor) -> list[torch.Tensor]:
        """``W x_o`` of the original inputs' columns, in the slices :meth:`add_outputs`
        takes: what the sums need of them (rows wide instead of d)."""
        step = self._step()
        return [orig[:, s:s + step] @ self.wt for s in range(0, orig.shape[1], step)]

    def add(self, cols: torch.Tensor, orig: torch.Tensor) -> None:
        """Add the compressed inputs' columns ``cols`` with the original ones ``orig``,
        one slice of samples at a time (``W x_o`` of every sample at once would be rows wide:
        4x the inputs at an FFN input layer)."""
        step = self._step()
        for s in range(0, cols.shape[1], step):
            self.add_outputs(cols[:, s:s + step], self.outputs(orig[:, s:s + step]))

    def add_outputs(self, cols: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """Add ``cols`` with the original inputs' :meth:`outputs` (consumed)."""
        step = self._step()
        if len(outputs) != -(-cols.shape[1] // step):
            raise ValueError("the original outputs do not match the inputs' samples")
        for i, s in enumerate(range(0, cols.shape[1], step)):
            c = cols[:, s:s + step]
            diff, outputs[i] = outputs[i], c.new_empty(0)
            diff.sub_(c @ self.wt)
            self.total = _add_product(self.total, diff, c)
            del diff

    def mean(self, n: int) -> torch.Tensor:
        if self.total is None:
            raise DataError("the calibration data never reached this layer")
        out, self.total = self.total.div_(float(n)), None
        return out
