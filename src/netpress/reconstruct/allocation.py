"""Non-uniform per-layer sparsity at a fixed total: pure functions on tensors.

OWL (outlier-weighted layer-wise sparsity, Yin et al. 2024): a layer whose Wanda scores
``|w| · ‖x‖`` hold many *outliers* (scores above ``m`` times the layer's mean score) is more
sensitive, so it gets less sparsity. Each layer's outlier ratio ``D_l`` is min-max scaled
to ``[0, 2λ]`` and subtracted from the target sparsity, then every layer is shifted by the
same amount so the parameter-weighted mean is exactly the target again (OWL averages over
equal-size blocks; with layers of different sizes the weighting keeps the total right).

:func:`depth_tilt` moves sparsity along the depth of the network at the same total: on
all-MiniLM-L6-v2 the late blocks cost about twice the embedding cosine per weight pruned of
the early ones, and a linear tilt towards the early blocks measured better on held-out
calibration text (BENCHMARKS.md, issue 11, fourth MiniLM follow-up).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["outlier_ratio", "owl_sparsities", "depth_tilt"]


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """The fraction of ``scores`` above ``m`` times their mean (OWL's layer outlier ratio)."""
    s = scores.detach().double().flatten()
    if s.numel() == 0:
        return 0.0
    return float((s > m * s.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float,
                   lam: float = 0.08, cap: float = 0.99) -> list[float]:
    """Per-layer sparsities from outlier ratios: ``sparsity - 2λ·(D_l - min D)/(max D - min D)``
    shifted so ``Σ s_l·n_l / Σ n_l == sparsity`` (``sizes`` n_l), each clipped to ``[0, cap]``
    (the clipped excess is spread over the layers that still have room).

    Equal ratios give the uniform allocation."""
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("ratios and sizes must be non-empty and of the same length")
    if not 0.0 <= sparsity <= cap or lam < 0:
        raise ValueError(f"sparsity={sparsity} must lie in [0, {cap}] and lam={lam} be >= 0")
    d = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * 2 * lam if span > 0 else torch.zeros_like(d)
    s = (sparsity - scaled).clamp(0.0, cap)
    for _ in range(len(ratios) + 1):  # shift the free layers until the mean is exact
        gap = sparsity * float(n.sum()) - float((s * n).sum())
        free = s < cap if gap > 0 else s > 0
        if abs(gap) < 1e-9 * float(n.sum()) or not bool(free.any()):
            break
        s = torch.where(free, s + gap / float(n[free].sum()), s).clamp(0.0, cap)
    return [float(v) for v in s]


def depth_tilt(base: Sequence[float], sizes: Sequence[int], depths: Sequence[int],
               tilt: float) -> list[float]:
    """Per-layer sparsities ``base`` tilted linearly with depth at the same total.

    A layer at depth ``d`` (e.g. its transformer block) gets ``tilt · (mid - d) / half``
    more sparsity, ``mid`` and ``half`` the centre and half-range of ``depths``: the
    shallowest layers ``+tilt``, the deepest ``-tilt`` (a negative ``tilt`` the reverse).
    All layers are then shifted by one amount so ``Σ s_l·n_l`` (``sizes`` n_l) equals
    ``Σ base_l·n_l``. Raises ``ValueError`` when a sparsity would leave ``[0, 1)``."""
    if not len(base) == len(sizes) == len(depths) or not base:
        raise ValueError("base, sizes and depths must be non-empty and of the same length")
    b = torch.tensor(base, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    d = torch.tensor(depths, dtype=torch.float64)
    half = float(d.max() - d.min()) / 2
    ramp = tilt * (float(d.min()) + half - d) / half if half > 0 else torch.zeros_like(d)
    s = b + ramp
    s += float(((b - s) * n).sum() / n.sum())
    if bool((s < 0).any()) or bool((s >= 1).any()):
        raise ValueError(f"tilt={tilt} takes a layer's sparsity to {float(s.min()):.3f} .. "
                         f"{float(s.max()):.3f}, outside [0, 1); use a smaller tilt")
    return [float(v) for v in s]
