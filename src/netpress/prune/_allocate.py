"""How much each group keeps, in stages, and what to say when the target is out of reach.

The plumbing between the channel graph and :mod:`.policy` for one pruning round: units are
ranked by their scores, the cost of a candidate (kept units per group) is the graph's MACs or
parameter estimate, and :func:`allocate` tries the stages described in
:mod:`netpress.prune.structured`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from netpress.errors import RecipeError
from netpress.graph import ChannelGraph
from netpress.prune.policy import (
    GroupPlan,
    frozen,
    keep_floor,
    relaxed,
    solve,
    too_narrow,
    uniform_counts,
    units_of,
)

if TYPE_CHECKING:
    from netpress.prune.structured import StructuredPrune

__all__ = ["Round", "allocate", "Unreachable", "unreachable", "round_info", "what_holds",
           "TOLERANCE"]


# allocation stages, tried in order: (exact groups only, round_to relaxed on narrow groups)
_STAGES = ((True, False), (True, True), (False, False), (False, True))
TOLERANCE = 0.03  # of the reference: more under the target than this is an overshoot


@dataclass
class Round:
    """One round's inputs: the graph of the model as it is now, its units' scores, and
    how its cost estimate converts to the measured units (``now / base``: the measured count
    of the model as it is, over the graph's estimate of it)."""

    graph: ChannelGraph
    scores: list[np.ndarray]
    cfg: StructuredPrune
    now: float
    base: float
    reference: float
    _order: list[np.ndarray] | None = None

    def mask(self, kept: list[int]) -> np.ndarray:
        """The labels removed when each group keeps ``kept`` of its best-scoring units."""
        if self._order is None:
            self._order = [g.units[np.argsort(s, kind="stable")]
                           for g, s in zip(self.graph.groups, self.scores)]
        mask = np.zeros(self.graph.blocked.size, dtype=bool)
        for g, order, k in zip(self.graph.groups, self._order, kept):
            mask[order[:len(g) - k]] = True
        return mask

    def cost(self, kept: list[int]) -> float:
        estimate = self.graph.macs if self.cfg.macs is not None else self.graph.params
        return self.now * estimate(self.mask(kept)) / self.base

    def plans(self, excluded: set[str], exact_only: bool, relax: bool) -> list[GroupPlan]:
        out = []
        for g, s in zip(self.graph.groups, self.scores):
            minimum, multiple = keep_floor(len(g), self.cfg.floor, g.width, self.cfg.round_to,
                                           g.align)
            plan = GroupPlan(len(g), minimum, multiple, s, units_of(g.align, g.width))
            if g.name in excluded or (exact_only and not g.exact):
                plan = frozen(plan)
            elif relax and too_narrow(plan):
                plan = relaxed(plan, self.cfg.floor)
            out.append(plan)
        return out


def allocate(r: Round, target: float, excluded: set[str]) -> tuple[list[int], list[int]]:
    """Kept units per group, and the most-pruned counts of the last stage tried.

    Stages: the exact groups alone, then with rounding relaxed where a group is too narrow
    for it, then every group (the hidden size too), then that with rounding relaxed. The
    first stage that meets the target without falling more than TOLERANCE under it wins,
    else the first that meets it at all."""
    fallback: list[int] | None = None
    most: list[int] = [len(g) for g in r.graph.groups]
    for exact_only, relax in _STAGES:
        plans = r.plans(excluded, exact_only, relax)
        most = uniform_counts(plans, 1.0)
        try:
            kept = solve(plans, r.cfg.allocation, r.cost, target)
        except ValueError:
            continue
        if r.cost(kept) >= target - TOLERANCE * r.reference:
            return kept, most
        fallback = fallback or kept
    if fallback is None:
        raise Unreachable(most)
    return fallback, most


class Unreachable(Exception):
    def __init__(self, most: list[int]) -> None:
        super().__init__()
        self.most = most


def what_holds(r: Round, pruned: np.ndarray) -> str:
    kind = "MACs" if r.cfg.macs is not None else "parameters"
    base = max(1.0, r.reference)
    held = r.graph.held(pruned, kind="macs" if r.cfg.macs is not None else "params")
    parts = [f"{where} ({r.now * n / r.base / base:.1%} of the reference's {kind}"
             + (f"; fixed by {', '.join(why[:2])}" if why else "") + ")"
             for where, n, why in held]
    return "; ".join(parts)


def unreachable(r: Round, target: float, most: list[int],
                 excluded: dict[str, str]) -> RecipeError:
    kind = "MACs" if r.cfg.macs is not None else "parameters"
    pruned = r.mask(most)
    left = "" if not excluded else (
        f" Left whole because their sizes could not follow: "
        f"{'; '.join(f'{g} ({why})' for g, why in list(excluded.items())[:3])}"
        + (f" and {len(excluded) - 3} more" if len(excluded) > 3 else "") + ".")
    return RecipeError(
        f"StructuredPrune: the target cannot be reached: with every removable group at its "
        f"floor (floor={r.cfg.floor}) the model keeps {r.cost(most) / r.reference:.1%} of the "
        f"reference's {kind}, for a target of {target / r.reference:.1%}. What holds the "
        f"rest: {what_holds(r, pruned)}.{left} Lower floor, protect fewer modules, or raise "
        f"the target")


def round_info(r: Round, kept: list[int], excluded: dict[str, str]) -> dict[str, Any]:
    groups = r.graph.groups
    plans = r.plans(set(), True, False)
    cut = [i for i, (g, k) in enumerate(zip(groups, kept)) if k < len(g)]
    return {"groups": {groups[i].name: [len(groups[i]), kept[i]] for i in cut},
            "unsupported": [u.where for u in r.graph.unsupported],
            "inexact_groups": [groups[i].name for i in cut if not groups[i].exact],
            "round_to_relaxed": [groups[i].name for i in cut
                                 if plans[i].multiple > 1 and kept[i] % plans[i].multiple],
            "excluded": dict(excluded)}
