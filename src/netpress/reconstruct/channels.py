"""Which channels to remove, judged by the layers that read them (group OBS).

For structured pruning followed by a least-squares refit, the cost of removing a unit (a
channel, a neuron, a head) is the output error its *readers* are left with once they have
compensated with the remaining inputs: for a reader with weights ``W`` and input Hessian
``H``, ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` over the unit's columns ``S``. Units are removed greedily,
cheapest first, each removal compensated before the next is chosen
(:func:`netpress.reconstruct.obs.greedy_unit_order`), summing over every reader of the group
(all the layers reading a residual stream, say).

A unit's score is the readers' output error once it and every unit removed before it are
gone, relative to their output energy ``tr(W H Wᵀ)``: scores grow along the greedy order (so
removing the ``k`` lowest removes its first ``k``), and one threshold across groups removes
from each group until its readers have lost that share of their outputs. Groups without a
reader the engine handles (none, or only grouped convs) get no score (``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from netpress.data import Data
from netpress.graph import ChannelGraph
from netpress.reconstruct.engine import collect_statistics
from netpress.reconstruct.layers import LayerView, is_hf_conv1d, supported
from netpress.reconstruct.obs import UnitLayer, damped, greedy_unit_order

__all__ = ["Reader", "group_readers", "obs_scores"]


@dataclass(frozen=True)
class Reader:
    """A layer reading a group's units: its name and each unit's matrix columns."""

    name: str
    columns: list[torch.Tensor]


def _unit_columns(module: nn.Module, positions: list[np.ndarray]) -> list[torch.Tensor]:
    k = int(np.prod(module.kernel_size)) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
    return [(torch.from_numpy(np.asarray(p, dtype=np.int64))[:, None] * k
             + torch.arange(k)[None, :]).reshape(-1) for p in positions]


def group_readers(model: nn.Module, graph: ChannelGraph) -> list[list[Reader]]:
    """For every group, the one-group layers whose *input* dimension its units span."""
    modules = dict(model.named_modules())
    out: list[list[Reader]] = []
    for g in graph.groups:
        readers: list[Reader] = []
        for (pid, dim), positions in g.slices.items():
            for path, attr in graph.trace.owners.get(pid, []):
                m = modules.get(path)
                if attr != "weight" or m is None or not supported(m) \
                        or getattr(m, "groups", 1) != 1:
                    continue
                if dim == (0 if is_hf_conv1d(m) else 1) and path not in {r.name for r in readers}:
                    readers.append(Reader(path, _unit_columns(m, positions)))
        out.append(readers)
    return out


def obs_scores(model: nn.Module, graph: ChannelGraph, data: Data, *, damp: float = 0.01,
               ) -> list[np.ndarray | None]:
    """One score per unit of each group (see the module docstring), from the input
    statistics of the groups' readers over ``data`` (the model as it is now)."""
    readers = group_readers(model, graph)
    names = sorted({r.name for rs in readers for r in rs})
    if not names:
        return [None] * len(readers)
    stats = collect_statistics(model, None, names, data, mode="sequential-local")
    prepared: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name in names:
        h = stats[name].hessian
        assert h is not None
        w = LayerView(model.get_submodule(name), name).matrix()[0]
        lower = torch.linalg.cholesky(damped(h[0], damp))
        energy = float((w @ h[0] * w).sum())
        prepared[name] = (w, torch.cholesky_inverse(lower), energy)
    out: list[np.ndarray | None] = []
    for rs in readers:
        if not rs:
            out.append(None)
            continue
        layers: list[UnitLayer] = [(prepared[r.name][0], prepared[r.name][1], r.columns)
                                   for r in rs]
        order, added = greedy_unit_order(layers)
        energy = max(sum(prepared[r.name][2] for r in rs), 1e-30)
        scores = np.empty(len(order))
        scores[order] = np.cumsum(added) / energy
        out.append(scores)
    return out
