"""R² range regularizers (Kundu et al., "R^2: Range Regularization for Model Compression and
Quantization", 2023) as pure functions of weight tensors, and a model-level sum.

Outlier weights stretch the quantization range of their layer; these terms pull the range in
during (pre-)training so the later quantization grid is finer:

* :func:`linf`: the largest magnitude, ``max |w|`` (only the extreme weight gets a gradient);
* :func:`margin`: every weight within ``width`` (a fraction of ``max |w|``) of the largest
  magnitude is pulled in, ``sum relu(|w| - (1 - width) * max |w|)`` (the edge detached);
* :func:`soft_min_max`: a smooth range ``smax(w) - smin(w)`` (softmax-weighted mean of ``w``
  at ``temperature``), which also handles asymmetric ranges.

:func:`range_penalty` sums one of them over a model's Conv/Linear weights; add
``strength * range_penalty(model, kind)`` to a recovery loss (see :func:`with_range_penalty`).

Two more recovery terms, switched on by every recovery's ``act_sparsity=`` and ``cond_reg=``
(:func:`training_penalties`):

* :func:`activation_l1`: an L1 penalty on chosen activation maps, which makes them sparse
  and so cheaper to hold and move once entropy-coded (Georgiadis 2019; measured by
  :mod:`netpress.measure.activations`);
* :func:`condition_surrogate`: a smooth, scale-free surrogate of a weight matrix's condition
  number (TSCNC, Feng et al. 2025: heavily pruned matrices become ill-conditioned, which
  makes the network fragile to input noise; measured by :mod:`netpress.measure.robustness`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from netpress.errors import SelectionError
from netpress.select import select_names, weighted_modules

__all__ = ["REGULARIZERS", "linf", "margin", "soft_min_max", "range_penalty",
           "with_range_penalty", "ACTIVATION_TYPES", "activation_l1", "condition_number",
           "condition_surrogate", "training_penalties"]

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


def linf(w: torch.Tensor) -> torch.Tensor:
    """``max |w|``."""
    return w.abs().max()


def margin(w: torch.Tensor, width: float = 0.1) -> torch.Tensor:
    """``sum relu(|w| - (1 - width) * max|w|)``: pulls in the whole top band, not one weight."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"margin width={width!r} must be in (0, 1]")
    a = w.abs()
    edge = (1.0 - width) * a.max().detach()  # a target, not differentiated: else the max rises
    return torch.relu(a - edge).sum()


def soft_min_max(w: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Smooth range: softmax-weighted max minus softmin-weighted min of ``w``."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    flat = w.reshape(-1)
    smax = (flat * torch.softmax(flat / temperature, 0)).sum()
    smin = (flat * torch.softmax(-flat / temperature, 0)).sum()
    return smax - smin


REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linf": linf, "margin": margin, "soft_min_max": soft_min_max}


def range_penalty(model: nn.Module, kind: str = "linf",
                  types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear),
                  ) -> torch.Tensor:
    """Sum of the ``kind`` regularizer over the weights of ``model``'s layers of ``types``."""
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown range regularizer {kind!r}; choose one of "
                         f"{sorted(REGULARIZERS)}")
    fn = REGULARIZERS[kind]
    weights = [getattr(m, "weight", None) for m in model.modules() if isinstance(m, types)]
    terms = [fn(w) for w in weights if isinstance(w, torch.Tensor)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def with_range_penalty(loss_fn: LossFn, model: nn.Module, kind: str,
                       strength: float) -> LossFn:
    """``loss_fn`` plus ``strength * range_penalty(model, kind)`` (a recovery-loop loss)."""
    def loss(out: torch.Tensor, teacher: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        return loss_fn(out, teacher, labels) + strength * range_penalty(model, kind).to(out)

    return loss


# -- activation sparsity (Georgiadis, "Accelerating Convolutional Neural Networks via
# Activation Map Compression", CVPR 2019) and condition-number control (TSCNC) ---------------

#: Module types whose outputs ``act_sparsity`` regularizes when no ``act_layers`` are named.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.PReLU)


def activation_l1(acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l mean|a_l|``: the L1 sparsity penalty over activation maps, each averaged over
    its elements so wide and narrow layers weigh alike."""
    if not acts:
        return torch.zeros(())
    return torch.stack([a.float().abs().mean() for a in acts]).sum()


def _alive(w: torch.Tensor) -> torch.Tensor:
    """``w`` as a matrix (out x rest) without its all-zero rows and columns (pruned away)."""
    m = w.reshape(w.shape[0], -1)
    with torch.no_grad():
        rows = m.abs().sum(1) > 0
        cols = m.abs().sum(0) > 0
    return m[rows][:, cols]


def condition_number(w: torch.Tensor) -> float:
    """``sigma_max / sigma_min`` of ``w`` as a matrix, zero rows and columns dropped
    (``inf`` if rank deficient; 1 for an empty matrix)."""
    m = _alive(w.detach().float())
    if m.numel() == 0:
        return 1.0
    s = torch.linalg.svdvals(m)
    return float(s.max() / s.min()) if float(s.min()) > 0 else math.inf


def condition_surrogate(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A smooth surrogate of the condition number: ``log(tr(G) tr((G + e I)^-1) / r^2)``.

    ``G`` is the Gram matrix of ``w`` as a matrix (rows = outputs; zero rows and columns,
    the pruned-away ones, dropped) over its smaller side ``r``, and ``e = eps * tr(G) / r``
    keeps the inverse finite. Since ``kappa^2 <= tr(G) tr(G^-1) <= r^2 kappa^2``, the value
    lies between ``2 log kappa - 2 log r`` and ``2 log kappa`` (for ``eps -> 0``): it is 0
    exactly when all singular values are equal, differentiable everywhere, and scale-free.
    """
    m = _alive(w.float())
    if m.numel() == 0:
        return w.new_zeros((), dtype=torch.float32)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    r = g.shape[0]
    tr = torch.diagonal(g).sum()
    ridge = (eps * tr / r).detach() * torch.eye(r, dtype=g.dtype, device=g.device)
    inv_tr = torch.diagonal(torch.linalg.inv(g + ridge)).sum()
    return torch.log(tr) + torch.log(inv_tr) - 2.0 * math.log(r)


def _activation_modules(model: nn.Module, layers: Sequence[str], owner: str) -> list[nn.Module]:
    names = [n for n, _ in model.named_modules() if n]
    if layers:
        chosen = select_names(names, layers, (), owner=owner, what="module")
    else:
        chosen = [n for n in names if isinstance(model.get_submodule(n), ACTIVATION_TYPES)]
        if not chosen:
            raise SelectionError(f"{owner}: act_sparsity found no activation module (ReLU, "
                                 f"GELU, ...) in the model; name the modules whose outputs to "
                                 f"sparsify with act_layers=[...] (names or 're:' patterns)")
    return [model.get_submodule(n) for n in chosen]


def _cond_weights(model: nn.Module, layers: Sequence[str], masks: Mapping[str, torch.Tensor],
                  owner: str) -> list[torch.Tensor]:
    """The weights ``cond_reg`` acts on: named layers, else the pruned ones, else all."""
    candidates = weighted_modules(model)
    if layers:
        names = select_names(list(candidates), layers, (), owner=owner)
    else:
        pruned = [n for n in candidates if f"{n}.weight" in masks]
        names = pruned or list(candidates)
    return [w for n in names if isinstance(w := getattr(candidates[n], "weight", None),
                                           torch.Tensor)]


@contextlib.contextmanager
def training_penalties(model: nn.Module, cfg: Any, masks: Mapping[str, torch.Tensor],
                       loss_fn: LossFn) -> Iterator[LossFn]:
    """``loss_fn`` plus the recovery's activation-sparsity and condition-number terms.

    ``cfg`` is a :class:`~netpress.recover.loop.TrainConfig`: ``act_sparsity`` (strength)
    adds ``act_sparsity * activation_l1`` over the outputs of ``act_layers`` (forward hooks,
    removed on exit; they record only while gradients are on, so evaluation passes are free),
    ``cond_reg`` adds ``cond_reg * mean(condition_surrogate)`` over ``cond_layers`` (default:
    the layers with pruning masks, else every Conv/Linear).
    """
    owner = cfg.type_name()
    acts: list[torch.Tensor] = []
    handles = []
    if cfg.act_sparsity:
        def keep(_m: nn.Module, _args: Any, out: Any) -> None:
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor):
                acts.append(out)

        for m in _activation_modules(model, cfg.act_layers, owner):
            handles.append(m.register_forward_hook(keep))
    weights = _cond_weights(model, cfg.cond_layers, masks, owner) if cfg.cond_reg else []

    def loss(out: torch.Tensor, teacher: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        total = loss_fn(out, teacher, labels)
        if handles:
            total = total + cfg.act_sparsity * activation_l1(acts).to(total)
            acts.clear()
        if weights:
            terms = torch.stack([condition_surrogate(w) for w in weights])
            total = total + cfg.cond_reg * terms.mean().to(total)
        return total

    try:
        yield loss
    finally:
        for h in handles:
            h.remove()
        acts.clear()
