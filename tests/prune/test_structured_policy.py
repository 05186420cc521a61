"""Allocation maths: floors, rounding and the bisection to a target."""

from __future__ import annotations

import numpy as np
import pytest

from netpress.prune.policy import (
    GroupPlan,
    global_counts,
    keep_floor,
    round_up,
    solve,
    uniform_counts,
)


def test_floor_and_rounding():
    assert keep_floor(64, 0.1, 1, 8) == (8, 8)
    assert keep_floor(12, 0.1, 64, 8) == (2, 1)  # heads of 64 channels: any count
    assert keep_floor(10, 0.5, 1, 1) == (5, 1)
    assert round_up(9, 8, 64) == 16 and round_up(9, 8, 12) == 12 and round_up(3, 1, 12) == 3


def _groups():
    rng = np.random.default_rng(0)
    return [GroupPlan(32, 4, 8, rng.random(32)), GroupPlan(16, 2, 1, rng.random(16))]


def test_uniform_and_global_counts():
    g = _groups()
    assert uniform_counts(g, 0.5) == [16, 8]
    assert uniform_counts(g, 1.0) == [8, 2]  # floors, rounded up to the multiple
    assert global_counts(g, -1.0) == [32, 16]
    assert global_counts(g, 2.0) == [8, 2]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_solve_meets_the_target_with_the_least_pruning(allocation):
    g = _groups()

    def cost(kept):
        return float(sum(kept))

    kept = solve(g, allocation, cost, 30.0)
    assert cost(kept) <= 30.0
    assert cost(kept) >= 30.0 - 8  # one rounding step at most
    with pytest.raises(ValueError, match="cannot be reached"):
        solve(g, allocation, cost, 5.0)
    assert solve(g, allocation, cost, 100.0) == [32, 16]


def test_narrow_groups_relax_their_rounding_but_not_their_alignment():
    from netpress.prune.policy import frozen, relaxed, too_narrow, units_of

    scores = np.ones(16)
    narrow = GroupPlan(16, *keep_floor(16, 0.1, 1, 8), scores)
    assert too_narrow(narrow) and uniform_counts([narrow], 0.3) == [16]  # 16 - 4 -> 16
    loose = relaxed(narrow, 0.1)
    assert loose.multiple == 1 and loose.minimum == 2 and uniform_counts([loose], 0.3) == [12]
    wide = GroupPlan(64, *keep_floor(64, 0.1, 1, 8), np.ones(64))
    assert not too_narrow(wide)
    aligned = GroupPlan(16, *keep_floor(16, 0.1, 1, 8, align=4), scores, units_of(4, 1))
    assert relaxed(aligned, 0.1).multiple == 4  # a kernel's alignment stays
    assert keep_floor(12, 0.1, 1, 8, align=3) == (12, 24)  # lcm(8, 3) channels
    assert units_of(8, 4) == 2 and units_of(4, 16) == 1
    assert uniform_counts([frozen(wide)], 0.9) == [64]
