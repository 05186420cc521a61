"""How many units to remove from each group: pure maths on counts and scores.

Two allocations:

* ``uniform``: every group removes the same fraction ``r`` of its units;
* ``global``: one threshold on the (group-normalised) importance scores across all groups.

Either way each group keeps at least ``floor`` of its units (and one), and a kept count is
rounded *up* to a multiple of ``round_to`` channels (a head of 64 channels already is one).
:func:`solve` bisects the single knob (``r``, or the threshold's rank) for the least
pruning whose cost (MACs or parameters, predicted by the graph) is at or under the target,
then :func:`refill` hands rounding steps back to groups (best pruned unit first) while the
target still holds, so coarse rounding does not overshoot the target by much.

A group can be left out of an allocation (:func:`frozen`: it keeps every unit), and a group
too narrow for its rounding step (:func:`too_narrow`: a 16-channel layer with ``round_to=8``
can only keep 8 or 16) can have it relaxed (:func:`relaxed`); the driver
(:mod:`netpress.prune.structured`) tries these in stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GroupPlan", "keep_floor", "round_up", "uniform_counts", "global_counts", "solve",
           "refill", "ALLOCATIONS", "too_narrow", "relaxed", "frozen", "units_of"]

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class GroupPlan:
    """One group as the policy sees it: unit count, minimum kept, rounding step, scores,
    and the step no relaxation goes under (a kernel's alignment, in units)."""

    size: int
    minimum: int
    multiple: int
    scores: np.ndarray  # one per unit, group-normalised
    align: int = 1


def too_narrow(g: GroupPlan) -> bool:
    """Fewer than four rounding steps in the group: rounding decides its size, not the
    target (16 channels with ``round_to=8``: 8 or 16)."""
    return g.multiple > g.align and g.size < 4 * g.multiple


def relaxed(g: GroupPlan, floor: float) -> GroupPlan:
    """``g`` with no rounding step beyond its alignment (its floor recomputed)."""
    minimum = max(1, int(math.ceil(floor * g.size - 1e-9)))
    return GroupPlan(g.size, round_up(minimum, g.align, g.size), g.align, g.scores, g.align)


def frozen(g: GroupPlan) -> GroupPlan:
    """``g`` left out of the allocation: it keeps all its units."""
    return GroupPlan(g.size, g.size, 1, g.scores, g.align)


def round_up(k: int, multiple: int, size: int) -> int:
    """``k`` rounded up to a multiple of ``multiple``, never above ``size``."""
    return min(size, int(math.ceil(k / multiple)) * multiple) if multiple > 1 else min(size, k)


def units_of(channels: int, width: int) -> int:
    """The fewest units of ``width`` channels that make a multiple of ``channels``."""
    return max(1, channels // math.gcd(channels, max(1, width))) if channels > 1 else 1


def keep_floor(size: int, floor: float, width: int, round_to: int,
               align: int = 1) -> tuple[int, int]:
    """``(minimum kept units, rounding step in units)`` for a group of ``size`` units of
    ``width`` channels each; kept channels are multiples of ``round_to`` and of ``align``."""
    multiple = units_of(round_to * align // math.gcd(round_to, align), width)
    minimum = max(1, int(math.ceil(floor * size - 1e-9)))
    return round_up(minimum, multiple, size), multiple


def _clamp(k: int, g: GroupPlan) -> int:
    return round_up(max(k, g.minimum), g.multiple, g.size)


def uniform_counts(groups: Sequence[GroupPlan], ratio: float) -> list[int]:
    """Kept units per group when each removes ``ratio`` of its units."""
    return [_clamp(g.size - int(math.floor(ratio * g.size + 1e-9)), g) for g in groups]


def global_counts(groups: Sequence[GroupPlan], threshold: float) -> list[int]:
    """Kept units per group when units scoring below ``threshold`` are removed."""
    return [_clamp(g.size - int((g.scores < threshold).sum()), g) for g in groups]


def solve(groups: Sequence[GroupPlan], allocation: str, cost: Callable[[list[int]], float],
          target: float) -> list[int]:
    """Kept counts with the least pruning whose ``cost`` is at most ``target``.

    Raises ValueError when even the most pruning the floors allow stays above the target.
    """
    if allocation == "uniform":
        def counts(x: float) -> list[int]:
            return uniform_counts(groups, x)
        knobs: list[float] = []
        lo_val, hi_val = 0.0, 1.0
    elif allocation == "global":
        knobs = sorted({float(s) for g in groups for s in g.scores.tolist()})
        knobs.append(math.inf)

        def counts(x: float) -> list[int]:
            return global_counts(groups, x)
        lo_val, hi_val = -math.inf, math.inf
    else:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    if cost(counts(lo_val)) <= target:
        return counts(lo_val)
    most = cost(counts(hi_val))
    if most > target:
        raise ValueError(f"the target cannot be reached: the most the floors allow is "
                         f"{most:.6g} for a target of {target:.6g}")
    if allocation == "uniform":
        lo, hi = lo_val, hi_val
        for _ in range(40):
            mid = (lo + hi) / 2
            if cost(counts(mid)) <= target:
                hi = mid
            else:
                lo = mid
        return refill(groups, counts(hi), cost, target)
    i, j = 0, len(knobs) - 1  # cost(knobs[j]) <= target
    while j - i > 1:
        mid = (i + j) // 2
        if cost(counts(knobs[mid])) <= target:
            j = mid
        else:
            i = mid
    return refill(groups, counts(knobs[j]), cost, target)


def refill(groups: Sequence[GroupPlan], kept: list[int], cost: Callable[[list[int]], float],
           target: float, passes: int = 2) -> list[int]:
    """Give groups back one rounding step each, best next unit first, while within target."""
    kept = list(kept)
    ranked = [np.sort(g.scores)[::-1] for g in groups]
    for _ in range(passes):
        nxt = [float(r[k]) if k < g.size else -math.inf for r, k, g in zip(ranked, kept, groups)]
        changed = False
        for i in sorted(range(len(groups)), key=lambda j: nxt[j], reverse=True):
            if kept[i] >= groups[i].size:
                continue
            trial = list(kept)
            trial[i] = min(groups[i].size, kept[i] + groups[i].multiple)
            if cost(trial) <= target:
                kept, changed = trial, True
        if not changed:
            break
    return kept
