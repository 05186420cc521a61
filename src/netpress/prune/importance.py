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
* ``grad_norm``: gradient-norm preservation (Lubana & Dick, "A Gradient Flow Framework For
  Analyzing Network Pruning", ICLR 2021): removing ``w`` changes the squared gradient norm
  ``||g||^2`` by ``-2 w^T H g`` to first order, so a unit scores ``|sum(w * Hg)|`` over its
  slice, with ``Hg`` from :func:`hessian_gradient_product`;
* ``obs``: the output error the layers reading the unit are left with after a least-squares
  compensation (group OBS, removed greedily; :mod:`netpress.reconstruct.channels`), from
  their input statistics on the calibration data.

Unstructured pruning scores single weights with the same criteria
(:func:`weight_scores`): ``magnitude`` ``|w|``, ``taylor`` ``|w * g|`` (loss preservation) and
``grad_norm`` ``|w * Hg|``.

Aggregation over the coupled tensors of a group: the unit scores of the tensors are averaged
(raw, so the tensors holding most of a unit's weights weigh most), then divided by their
mean over the group's units. A unit's score is therefore relative to its group (mean 1),
which is what the global allocation ranks. (Normalising each tensor before averaging was
tried and lost ~20 points of one-shot accuracy on ResNet-56 at 50% MACs: it lets a BN scale
outvote a conv's 576 weights.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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
    "grad_norm_saliency",
    "hessian_gradient_product",
    "WEIGHT_CRITERIA",
    "weight_scores",
]

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "hessian", "grad_norm", "obs")
DATA_CRITERIA = ("taylor", "hessian", "grad_norm", "obs")
#: Per-weight criteria of unstructured pruning (the last two need data).
WEIGHT_CRITERIA = ("magnitude", "taylor", "grad_norm")
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


def grad_norm_saliency(rows: torch.Tensor, hg: torch.Tensor) -> torch.Tensor:
    """``|sum(w * Hg)|`` per row: the first-order change of ``||g||^2 / 2`` when the row is
    zeroed (gradient-norm preservation)."""
    return (rows.float() * hg.float()).sum(1).abs()


def weight_scores(criterion: str, weight: torch.Tensor,
                  derivative: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight importance for unstructured pruning (same shape as ``weight``).

    ``magnitude``: ``|w|``; ``taylor``: ``|w * g|`` with ``derivative`` the loss gradient;
    ``grad_norm``: ``|w * Hg|`` with ``derivative`` the Hessian-gradient product.
    """
    if criterion not in WEIGHT_CRITERIA:
        raise ValueError(f"unknown importance {criterion!r}; choose one of {WEIGHT_CRITERIA}")
    if criterion == "magnitude":
        return weight.detach().abs()
    if derivative is None:
        raise ValueError(f"importance {criterion!r} needs the derivative of the weight")
    return (weight.detach().float() * derivative.float()).abs()


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
    gradient (``taylor``), Hessian diagonal (``hessian``) or Hessian-gradient product
    (``grad_norm``); ``is_bn[i]`` marks BatchNorm
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
    fn = {"taylor": taylor, "hessian": hessian_saliency, "grad_norm": grad_norm_saliency}[criterion]
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


def hessian_gradient_product(batch_losses: Callable[[], Iterable[torch.Tensor]],
                             params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H g`` of the summed loss ``L = sum_b L_b`` w.r.t. ``params``, exactly.

    ``batch_losses()`` returns a fresh iterable of the batch losses ``L_b`` (computed with
    grad enabled); it is called twice: once to sum ``g = grad L``, once for
    ``H g = sum_b grad(grad L_b . g)`` with ``g`` held fixed (one double backward per batch).
    """
    params = list(params)
    g = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for loss in batch_losses():
        for acc, part in zip(g, torch.autograd.grad(loss, params, allow_unused=True)):
            if part is not None:
                acc.add_(part.float())
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for loss in batch_losses():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        terms = [(gr * v.to(gr.dtype)).sum() for gr, v in zip(grads, g) if gr is not None]
        if not terms:
            continue
        dot = torch.stack(terms).sum()
        if not dot.requires_grad:  # the loss is linear in every parameter: H g = 0
            continue
        for acc, h in zip(out, torch.autograd.grad(dot, params, allow_unused=True)):
            if h is not None:
                acc.add_(h.float())
    return out
