"""Mask maths on tiny tensors: exact counts, the per-layer floor, and the cubic ramp."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netpress.prune.masks import (
    cubic_sparsity,
    floor_keep,
    global_prune_counts,
    magnitude_mask,
    prune_count,
    smallest_mask,
)


def test_magnitude_mask_drops_smallest():
    w = torch.tensor([0.5, -0.1, 2.0, -3.0, 0.05])
    assert magnitude_mask(w, 0.4).tolist() == [True, False, True, True, False]


def test_ties_are_deterministic_by_position():
    w = torch.zeros(6)
    assert smallest_mask(w, 2).tolist() == [False, False, True, True, True, True]


@given(st.integers(1, 400), st.floats(0, 0.999), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_exact_count(n, s, seed):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    assert int((~magnitude_mask(w, s)).sum()) == prune_count(n, s) == round(s * n)


def test_global_threshold_without_floor_matches_plain_global_ranking():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(50, generator=g), torch.rand(200, generator=g) * 0.5]
    counts = global_prune_counts(scores, 0.6, [0, 0])
    allv = torch.cat(scores)
    thr = allv.sort().values[int(0.6 * 250) - 1]
    assert counts == [int((s <= thr).sum()) for s in scores]
    assert sum(counts) == 150


def test_floor_holds_small_layer_and_redistributes():
    # layer 0 has tiny weights: plain global pruning would wipe it out entirely.
    scores = [torch.full((100,), 1e-3) + torch.arange(100) * 1e-6, torch.rand(900) + 0.1]
    floors = [floor_keep(100, 0.1), floor_keep(900, 0.1)]
    counts = global_prune_counts(scores, 0.5, floors)
    assert counts[0] == 90  # held at the floor: keeps 10%
    assert sum(counts) == 500  # the global target is met exactly
    assert 900 - counts[1] >= floors[1]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.floats(0, 0.9),
       st.floats(0, 0.1), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_global_counts_invariants(sizes, s, floor, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) * float(torch.rand(1, generator=g)) for n in sizes]
    floors = [floor_keep(n, floor) for n in sizes]
    if prune_count(sum(sizes), s) > sum(n - f for n, f in zip(sizes, floors)):
        with pytest.raises(ValueError, match="floors allow"):
            global_prune_counts(scores, s, floors)
        return
    counts = global_prune_counts(scores, s, floors)
    assert sum(counts) == prune_count(sum(sizes), s)
    assert all(0 <= c <= n - f for c, n, f in zip(counts, sizes, floors))


def test_floor_keep():
    assert floor_keep(100, 0.05) == 5
    assert floor_keep(101, 0.05) == 6
    assert floor_keep(100, 0.0, min_weights=20) == 20
    assert floor_keep(10, 0.0, min_weights=20) == 10


def test_cubic_ramp():
    assert cubic_sparsity(0, 100, 0.8) == 0.0
    assert cubic_sparsity(100, 100, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(50, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    values = [cubic_sparsity(t, 100, 0.9) for t in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert math.isclose(cubic_sparsity(500, 100, 0.9), 0.9)
