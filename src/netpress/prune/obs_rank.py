"""Which units of a group ``FisherPrune`` removes: those its reading layer misses least.

:mod:`netpress.prune.fisher_select` decides *how many* heads and FFN neurons each group
loses (least Fisher score per MAC across groups, under the MACs target). *Which* of a
group's units go is, with ``FisherPrune(rank="obs")`` (the default), decided by the layer
that reads them (``o_proj`` / ``down_proj``): greedy group OBS on that layer's input
Hessian ``H = Σ xᵀx`` over the calibration tokens
(:func:`netpress.reconstruct.obs.greedy_unit_order`) removes the unit whose loss the
remaining input columns compensate best by least squares, updates, and repeats: the error
left is what the least-squares refit after the cut
(:mod:`netpress.prune.refit`) starts from. The diagonal Fisher of Kwon et al. 2022
(``rank="fisher"``) ranks a unit by the loss of masking it alone, with no compensation;
ranking by the compensated reconstruction error follows ZipLM (Kurtić et al. 2023).

Measured (BENCHMARKS.md, "Issue 13, nineteenth part"): all-MiniLM-L6-v2 at 50% MACs, no
training, 512 calibration sentences: embedding cosine 0.9240 with Fisher ranks, 0.9367
with OBS ranks (the same number of units removed from each group).

The Hessians are gathered a few readers at a time (at most ``budget`` bytes of them, one
forward pass per chunk that stops after its last reader), so memory stays bounded on wide
models; ``chunk`` units are removed per update for wide groups (at most
:data:`UPDATES` updates per group; the exact one-at-a-time greedy order below that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress.prune._blocks import forward_each
from netpress.prune._fisher_pass import _Group
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.obs import damped, greedy_unit_order

__all__ = ["RANKS", "UPDATES", "reader_hessians", "removal_order", "obs_removals"]

#: how ``FisherPrune`` picks the units a group loses (see the module docs)
RANKS = ("obs", "fisher")

#: the most compensating updates of one group's reader (wider groups remove several units
#: per update)
UPDATES = 64

#: bytes of float64 Hessians gathered in one forward pass (one reader's at least)
BUDGET = 256 * 2**20


def reader_hessians(model: nn.Module, readers: Sequence[str], data: list[Any],
                    budget: int = BUDGET) -> Any:
    """Yield ``(name, H)`` for every reader: ``H = Σ xᵀx`` (float64, CPU) over the real
    tokens of its inputs on ``data`` (padding left out, as the refit does). Readers are taken
    in the model's forward order, as many per forward pass as ``budget`` bytes of Hessians
    allow; each pass stops after its chunk's last reader."""
    modules = dict(model.named_modules())
    wanted = set(readers)
    order = [n for n, _ in model.named_modules() if n in wanted]
    missing = wanted - set(order)
    if missing:
        raise ValueError(f"no module named {sorted(missing)[0]!r} in the model")
    chunks: list[list[str]] = []
    size = 0
    for name in order:
        d = LayerView(modules[name], name).matrix()[0].shape[1]
        if chunks and size + 8 * d * d <= budget:
            chunks[-1].append(name)
            size += 8 * d * d
        else:
            chunks.append([name])
            size = 8 * d * d
    for chunk in chunks:
        sums = _chunk_hessians(model, chunk, data)
        for name in chunk:
            if name not in sums:
                raise ValueError(f"{name!r} was not called on the calibration data")
            yield name, sums.pop(name)


def _chunk_hessians(model: nn.Module, chunk: list[str],
                    data: list[Any]) -> dict[str, torch.Tensor]:
    """One forward pass over ``data`` summing ``xᵀx`` of the real-token inputs of every
    module in ``chunk`` (in forward order), stopping after the last one."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    real: dict[str, torch.Tensor | None] = {}

    class _Stop(Exception):
        pass

    def hook(name: str, last: bool) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = real.get("mask")
            rows = x[mask] if mask is not None and x.dim() == 3 and \
                mask.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            rows = rows.double().cpu()
            h = rows.T @ rows
            sums[name] = h if name not in sums else sums[name] + h
            if last:
                raise _Stop
        return fn

    def before(x: Any) -> None:
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        real["mask"] = mask.bool() if isinstance(mask, torch.Tensor) else None

    # a module called more than once per forward (shared across depths) gets all its calls
    many = _called_often(model, chunk[-1], data[:1])
    handles = [modules[n].register_forward_pre_hook(hook(n, n == chunk[-1] and not many))
               for n in chunk]
    forward_each(model, data, handles, _Stop, before)
    return sums


def _called_often(model: nn.Module, name: str, data: list[Any]) -> bool:
    """Whether the forward calls module ``name`` more than once per batch."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    handle = model.get_submodule(name).register_forward_pre_hook(count)
    forward_each(model, data, [handle], StopIteration)
    return calls[0] > 1


def removal_order(weight: torch.Tensor, hessian: torch.Tensor,
                  columns: Sequence[np.ndarray], count: int, damp: float = 0.01) -> list[int]:
    """The first ``count`` units (each a set of input ``columns`` of ``weight``, out × in)
    removed by greedy group OBS on ``hessian`` (damped by ``damp`` times its mean
    diagonal), at most :data:`UPDATES` compensating updates."""
    if count <= 0:
        return []
    w = weight.detach().double().cpu()
    lower = torch.linalg.cholesky(damped(hessian.double(), damp))
    hinv = torch.cholesky_inverse(lower)
    cols = [torch.from_numpy(np.asarray(c, dtype=np.int64)) for c in columns]
    order, _ = greedy_unit_order([(w, hinv, cols)], count=count,
                                 chunk=max(1, math.ceil(count / UPDATES)))
    return order


def obs_removals(model: nn.Module, groups: Sequence[_Group], parts: Sequence[np.ndarray],
                 data: list[Any], damp: float = 0.01,
                 budget: int = BUDGET) -> list[np.ndarray]:
    """For each group, a removal mask with as many units as its entry of ``parts`` (the
    Fisher selection's), chosen by :func:`removal_order` on its reader in ``model`` (the
    unpruned working copy)."""
    wanted: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if parts[i].any():
            wanted.setdefault(g.reader, []).append(i)
    out = [np.asarray(p, dtype=bool).copy() for p in parts]
    modules = dict(model.named_modules())
    for name, hessian in reader_hessians(model, list(wanted), data, budget):
        weight = LayerView(modules[name], name).matrix()[0]
        for i in wanted[name]:
            order = removal_order(weight, hessian, groups[i].columns, int(parts[i].sum()),
                                  damp)
            mask = np.zeros(len(parts[i]), dtype=bool)
            mask[order] = True
            out[i] = mask
    return out
