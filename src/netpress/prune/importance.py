"""Importance of structured-pruning units: pure functions on tensors.

One interface, :func:`unit_scores`: given, for each tensor coupled to a group, the rows of
its units (``rows[u]`` = the flattened slice of unit ``u``), and for the data-driven
criteria the matching gradient or Hessian-diagonal rows, it returns one score per unit.

Criteria (``CRITERIA``):

* ``l1`` / ``l2``: the slice's L1 norm / squared L2 norm;
* ``bn_scale``: ``|gamma|`` of the BatchNorm weights in the group (only those tensors count);
* ``taylor``: first-order Taylor estimate of the loss change on removing the unit,
  ``|sum(w * dL/dw)|`` over the slice (Molchanov et al. 2019), gradients summed over batches;
* ``hessian``: Hessian-aware saliency ``|mean(diag H)| * ||w||^2`` over the slice (HAP/EHAP),
  with ``diag H`` from the Hutchinson estimator :func:`hutchinson_diagonal`;
* ``obs``: the output error the layers reading the unit are left with after a least-squares
  compensation (group OBS, removed greedily; :mod:`netpress.reconstruct.channels`), from
  their input statistics on the calibration data.

Aggregation over the coupled tensors of a group: the unit scores of the tensors are averaged
(raw, so the tensors holding most of a unit's weights weigh most), then divided by their
mean over the group's units. A unit's score is therefore relative to its group (mean 1),
which is what the global allocation ranks. (Normalising each tensor before averaging was
tried and lost ~20 points of one-shot accuracy on ResNet-56 at 50% MACs: it lets a BN scale
outvote a conv's 576 weights.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "CRITERIA",
    "DATA_CRITERIA",
    "magnitude",
    "taylor",
    "hessian_saliency",
    "normalize",
    "aggregate",
    "unit_scores",
    "hutchinson_diagonal",
]

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "hessian", "obs")
DATA_CRITERIA = ("taylor", "hessian", "obs")
_EPS = 1e-12


def magnitude(rows: torch.Tensor, p: int) -> torch.Tensor:
    """L1 norm (``p=1``) or squared L2 norm (``p=2``) of each row of ``rows`` (units x elements)."""
    rows = rows.float()
    return rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1)


def taylor(rows: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``|sum(w * g)|`` per row: the first-order loss change when the row is zeroed."""
    return (rows.float() * grads.float()).sum(1).abs()


def hessian_saliency(rows: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``|mean(diag H)| * ||w||^2`` per row (the trace-based saliency of HAP)."""
    return diag.float().mean(1).abs() * rows.float().pow(2).sum(1)


def normalize(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean (all ones when the mean is zero)."""
    mean = scores.mean()
    if float(mean) <= _EPS:
        return torch.ones_like(scores)
    return scores / mean


def aggregate(per_tensor: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of their unit scores, normalised by its mean over the units."""
    if not per_tensor:
        raise ValueError("no tensor to score")
    return normalize(torch.stack(list(per_tensor)).mean(0))


def unit_scores(criterion: str, rows: Sequence[torch.Tensor],
                extra: Sequence[torch.Tensor | None] | None = None,
                is_bn: Sequence[bool] | None = None) -> torch.Tensor:
    """Scores of a group's units from the rows of each coupled tensor.

    ``rows[i]`` is a (units x elements) matrix for tensor ``i``; ``extra[i]`` the matching
    gradient (``taylor``) or Hessian diagonal (``hessian``); ``is_bn[i]`` marks BatchNorm
    scales (``bn_scale``; a group without one falls back to ``l2``).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance {criterion!r}; choose one of {CRITERIA}")
    if criterion == "bn_scale":
        flags = list(is_bn or [False] * len(rows))
        chosen = [r for r, b in zip(rows, flags) if b]
        if chosen:
            return aggregate([magnitude(r, 1) for r in chosen])
        criterion = "l2"
    if criterion in ("l1", "l2"):
        return aggregate([magnitude(r, 1 if criterion == "l1" else 2) for r in rows])
    pairs = [(r, e) for r, e in zip(rows, extra or [None] * len(rows)) if e is not None]
    if not pairs:
        raise ValueError(f"importance {criterion!r} needs gradients for the group's tensors")
    fn = taylor if criterion == "taylor" else hessian_saliency
    return aggregate([fn(r, e) for r, e in pairs])


def hutchinson_diagonal(loss: torch.Tensor, params: Sequence[torch.Tensor], samples: int,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of ``loss`` w.r.t. ``params``.

    ``diag(H) ~ mean_s v_s * (H v_s)`` over ``samples`` Rademacher vectors ``v_s``; one
    Hessian-vector product each (double backward). The sum of the estimate over a slice is
    an unbiased estimate of the trace of that slice's Hessian block.
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for _ in range(samples):
        vs = [torch.randint(0, 2, p.shape, generator=generator, device="cpu")
              .to(device=p.device, dtype=g.dtype) * 2 - 1 for p, g in zip(params, grads)]
        hv = torch.autograd.grad(grads, list(params), grad_outputs=vs, retain_graph=True,
                                 allow_unused=True)
        for acc, v, h in zip(out, vs, hv):
            if h is not None:
                acc.add_((v * h).float())
    return [o / max(1, samples) for o in out]
