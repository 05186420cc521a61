"""Which heads and FFN neurons ``FisherPrune`` removes to meet a MACs target.

Every group (the heads of one attention layer, the neurons of one FFN) ranks its units by
Fisher score; :func:`select` removes the units of least score per MAC saved across all
groups (:func:`netpress.prune.fisher.select_by_ratio`) until the measured MACs meet the goal,
with every group keeping at least a floor share of its units. Without an explicit
``min_fraction`` the floor follows the target (:func:`target_floor`) and is lowered step by
step when it makes a reachable target unreachable (:func:`floors`). A target out of reach is
a :class:`~netpress.errors.RecipeError` saying how far the groups can go.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from netpress.errors import RecipeError
from netpress.graph import ChannelGraph
from netpress.prune._fisher_pass import _Group
from netpress.prune._macs_estimate import estimator
from netpress.prune.fisher import select_by_ratio

if TYPE_CHECKING:
    from netpress.prune.posttraining import FisherPrune

__all__ = ["REFILL_MARGIN", "target_floor", "floors", "select", "removal", "without", "first"]

#: the share of the target the refill of the selection (units put back after the last,
#: large, removal) leaves unused, for what the MACs estimate (:mod:`._macs_estimate`) and the
#: measured count still disagree on
REFILL_MARGIN = 0.005


def target_floor(goal: float, total: float, fixed: float, share: float) -> float:
    """The fraction of its units every group keeps at least when the floor follows the
    target: ``share`` times the fraction of the removable MACs that a ``goal`` of ``total``
    MACs leaves, ``fixed`` of them being MACs no unit removal changes (embeddings,
    a language model's output layer). 0 when the goal leaves none of them."""
    if total <= fixed:
        return 0.0
    return min(1.0, max(0.0, share * (goal - fixed) / (total - fixed)))


def minimum(cfg: FisherPrune, units: int, floor: float, up: bool = True) -> int:
    """Units a group of ``units`` keeps at least (``floor``: the fraction in force, rounded
    up, or down with ``up=False``)."""
    kept = math.ceil(floor * units - 1e-9) if up else math.floor(floor * units + 1e-9)
    return min(units, max(cfg.min_units, kept))


def first(names: Any, n: int = 3) -> list[str]:
    """The first ``n`` names, then ``"..."`` if there are more."""
    names = list(names)
    return names[:n] + (["..."] if len(names) > n else [])


def floors(floor: float, auto: bool) -> list[tuple[float, bool]]:
    """The (floor, round up) pairs tried in turn. An explicit floor is kept as given. A floor
    set from the target is rounded up in each group, then down (rounded up in small groups it
    can overshoot the target), then halved twice and dropped: it assumes every group can be
    cut to about the same share, which groups of a few units cannot (a layer with two
    key/value groups keeps one, half of its attention, however low the floor), so on a small
    grouped-query model it could make a reachable target unreachable."""
    if not auto:
        return [(floor, True)]
    return [(floor, True), (floor, False), (floor / 2, False), (floor / 4, False), (0.0, False)]


def removal(graph: ChannelGraph, groups: list[_Group], parts: list[np.ndarray]) -> np.ndarray:
    """The label mask removing, in each group, the units its ``parts`` entry marks."""
    mask = np.zeros(graph.blocked.size, dtype=bool)
    for g, part in zip(groups, parts):
        mask[graph.groups[g.index].units[part]] = True
    return mask


def without(graph: ChannelGraph, groups: list[_Group], names: set[str]) -> list[_Group]:
    return [g for g in groups if graph.groups[g.index].name not in names]


def select(graph: ChannelGraph, groups: list[_Group], scores: dict[int, torch.Tensor],
            cfg: FisherPrune, goal: float, now: float, base: float,
            whole: dict[str, str]) -> tuple[list[np.ndarray], float]:
    """Removal masks per group (step 3 of the module docs) for ``goal`` measured MACs
    (``now``: the measured count of the model, ``base``: the graph's estimate of it), and
    the floor in force. ``whole``: groups left whole, for the refusal."""
    sizes = [len(graph.groups[g.index]) for g in groups]
    costs = []
    for g, n in zip(groups, sizes):
        everything = np.zeros(graph.blocked.size, dtype=bool)
        everything[graph.groups[g.index].units] = True
        costs.append((base - graph.macs(everything)) / n)
    offsets = np.cumsum([0, *sizes])
    floor = cfg.min_fraction
    if floor is None:  # the target's average share of the removable MACs (graph estimate)
        every = removal(graph, groups, [np.ones(n, dtype=bool) for n in sizes])
        floor = target_floor(goal * base / now, base, graph.macs(every), cfg.min_share)
    measured = estimator(graph, now)  # the graph's estimate, made to agree with count_macs

    def split(flat: np.ndarray) -> np.ndarray:
        return removal(graph, groups, [flat[offsets[i]:offsets[i + 1]]
                                        for i in range(len(groups))])

    def spare(flat: np.ndarray) -> float:  # graph MACs the refill may put back
        return (goal * (1 - REFILL_MARGIN) - measured(split(flat))) * base / now

    def over(flat: np.ndarray) -> bool:
        return measured(split(flat)) > goal

    error: Exception | None = None
    for fraction, up in floors(floor, auto=cfg.min_fraction is None):
        try:
            return select_by_ratio([scores[g.index].numpy() for g in groups], costs,
                                   [minimum(cfg, n, fraction, up) for n in sizes],
                                   over, spare), fraction
        except ValueError as exc:
            error = exc
    least = removal(graph, groups, [np.arange(n) >= cfg.min_units for n in sizes])
    lowest = graph.macs(least) / base * now / (goal / cfg.macs)
    left = "" if not whole else (f" Left whole because their sizes could not follow "
                                 f"({', '.join(first(whole))}).")
    raise RecipeError(
        f"FisherPrune: {error}; raise macs or lower min_units / min_fraction (the floor "
        f"in force: {floor:.3f}) / min_share. Even with every group of heads and FFN "
        f"neurons cut to min_units={cfg.min_units}, {lowest:.1%} of the MACs would stay: "
        "the rest is in layers FisherPrune does not prune (embeddings, the output "
        "layer, convolutions, layers outside the attention/FFN groups it found, "
        f"{len(groups)} groups read by {', '.join(first(g.reader for g in groups))});"
        f"{left} StructuredPrune can cut those") from None
