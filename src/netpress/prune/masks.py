"""Mask maths for unstructured pruning: pure functions on tensors.

Nothing here knows about modules or data. Counts are exact: a sparsity ``s`` over ``n``
weights prunes ``round(s * n)`` of them, ties broken by position so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "prune_count",
    "smallest_mask",
    "magnitude_mask",
    "floor_keep",
    "global_prune_counts",
    "cubic_sparsity",
]


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity prunes: ``round(sparsity * numel)``."""
    return min(numel, max(0, int(round(sparsity * numel))))


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask that drops exactly the ``k`` smallest scores (ties: lower index first)."""
    flat = scores.detach().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat.float(), stable=True).indices
        keep[order[:k]] = False
    return keep.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a layer pruned by weight magnitude to ``sparsity``."""
    return smallest_mask(weight.abs(), prune_count(weight.numel(), sparsity))


def floor_keep(numel: int, floor: float, min_weights: int = 0) -> int:
    """Weights a layer keeps at least: ``max(ceil(floor * numel), min(min_weights, numel))``."""
    return min(numel, max(int(math.ceil(floor * numel - 1e-9)), min(min_weights, numel)))


def _threshold_counts(scores: Sequence[torch.Tensor], k: int) -> list[int]:
    """Per-tensor counts of the ``k`` globally smallest scores (ties: earlier tensors first)."""
    if k <= 0:
        return [0] * len(scores)
    flat = [s.detach().reshape(-1).float() for s in scores]
    allv = torch.cat(flat)
    thr = torch.kthvalue(allv.cpu(), k).values.item()
    below = [int((f < thr).sum()) for f in flat]
    ties = k - sum(below)
    counts = []
    for f, b in zip(flat, below):
        take = min(ties, int((f == thr).sum()))
        counts.append(b + take)
        ties -= take
    return counts


def global_prune_counts(
    scores: Sequence[torch.Tensor], sparsity: float, keep_floor: Sequence[int]
) -> list[int]:
    """Prune counts per layer for one global threshold with a per-layer floor.

    The Global Magnitude Pruning rule with a minimum threshold: rank all scores together and
    prune the smallest ``round(sparsity * N)``; any layer that would keep fewer than its
    ``keep_floor`` weights is held at the floor, the rest of the budget is redistributed over
    the other layers by a new global threshold, and the loop repeats until no layer is below
    its floor. The total pruned count equals the target exactly.

    Raises ``ValueError`` when the floors make the target unreachable.
    """
    sizes = [s.numel() for s in scores]
    target = prune_count(sum(sizes), sparsity)
    capacity = [n - f for n, f in zip(sizes, keep_floor)]
    if target > sum(capacity):
        raise ValueError(
            f"sparsity {sparsity} needs {target} weights pruned but the per-layer floors allow "
            f"at most {sum(capacity)} ({sum(capacity) / max(1, sum(sizes)):.4f} sparsity)"
        )
    held: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in held]
        budget = target - sum(held.values())
        counts = dict(zip(free, _threshold_counts([scores[i] for i in free], budget)))
        over = [i for i in free if counts[i] > capacity[i]]
        if not over:
            counts.update(held)
            return [counts[i] for i in range(len(scores))]
        for i in over:
            held[i] = capacity[i]


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic ramp: ``s_f + (s_i - s_f) * (1 - t/T)^3``, clamped to [0, T]."""
    if total <= 0:
        return final
    frac = min(1.0, max(0.0, step / total))
    return final + (initial - final) * (1.0 - frac) ** 3
