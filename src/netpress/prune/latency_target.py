"""Structured pruning to a *measured* latency target.

MACs are a proxy: on a real runtime the time of a pruned model is roughly affine in its MACs
(fixed per-layer overheads do not shrink), so halving the MACs gives less than a 2× speed-up.
``StructuredPrune(latency=0.6)`` therefore searches the MACs fraction ``m`` whose pruned model
*measures* at most 60% of the reference's latency on the chosen runtime (PyTorch eager or
ONNX Runtime, fixed batch size and thread count):

* :func:`next_fraction` (pure) fits the measured ``(m, latency ratio)`` points with a line
  between the two that bracket the target (or the two nearest when none do) and proposes the
  next ``m``;
* :func:`search_latency` prunes, measures and repeats for a few rounds, and returns the
  largest-``m`` model that meets the target (the least pruning that is fast enough).

Each round is one pruning call (under a second on a ResNet-56) plus a timing, so a search
costs seconds. Timings are medians; noise on a busy machine can shift the chosen ``m`` by a few
percent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress._inputs import Inputs
from netpress.errors import RecipeError

__all__ = ["RUNTIMES", "next_fraction", "LatencyRatio", "search_latency"]

RUNTIMES = ("eager", "onnxruntime")
_MIN_FRACTION = 0.01


def next_fraction(points: Sequence[tuple[float, float]], target: float) -> float:
    """The next MACs fraction to try, from measured ``(macs_fraction, latency_ratio)`` points.

    Interpolates linearly between the closest points below and above ``target`` (or
    extrapolates from the two nearest ones), clamped to ``(0, 1]``. With a single point the
    latency is taken as proportional to MACs.
    """
    if not points:
        return min(1.0, max(_MIN_FRACTION, target))
    pts = sorted(set(points))
    below = [p for p in pts if p[1] <= target]
    above = [p for p in pts if p[1] > target]
    if below and above:
        (m0, l0), (m1, l1) = max(below, key=lambda p: p[0]), min(above, key=lambda p: p[0])
    elif len(pts) >= 2:
        (m0, l0), (m1, l1) = sorted(pts, key=lambda p: abs(p[1] - target))[:2]
    else:
        m, lat = pts[0]
        return min(1.0, max(_MIN_FRACTION, m * target / max(lat, 1e-12)))
    if abs(l1 - l0) < 1e-12:
        guess = min(m0, m1) if l0 > target else max(m0, m1)
    else:
        guess = m0 + (target - l0) * (m1 - m0) / (l1 - l0)
    return min(1.0, max(_MIN_FRACTION, guess))


class LatencyRatio:
    """Measures ``latency(candidate) / latency(reference)`` on one runtime.

    The two models are timed in alternating rounds
    (:func:`~netpress.measure.latency.measure_latency_interleaved`, medians over all rounds),
    so load on the machine and frequency drift hit both alike; timing them one after the
    other made the ratio swing by 30% on a busy 2-core machine. For ONNX Runtime both are
    exported and run as :class:`~netpress.export.onnx.OrtModule`; the reference once.
    """

    def __init__(self, reference: nn.Module, example_inputs: Inputs, *, runtime: str,
                 batch_size: int, threads: int, repeats: int = 24, rounds: int = 4) -> None:
        if runtime not in RUNTIMES:
            raise RecipeError(f"latency_runtime={runtime!r}; choose one of {RUNTIMES}")
        if runtime == "onnxruntime" and not isinstance(example_inputs, torch.Tensor):
            raise RecipeError("StructuredPrune(latency_runtime='onnxruntime') needs a single "
                              "tensor as example_inputs; time models with tuple or keyword "
                              "inputs in eager mode (latency_runtime='eager')")
        self.example_inputs, self.runtime = example_inputs, runtime
        self.batch_size, self.threads = batch_size, threads
        self.repeats, self.rounds = repeats, rounds
        self._tmp = tempfile.TemporaryDirectory(prefix="netpress-latency-")
        self._count = 0
        self.reference = self._runnable(reference)

    def _runnable(self, model: nn.Module) -> nn.Module:
        if self.runtime == "eager":
            return model
        from netpress.export.onnx import OrtModule, export_onnx

        self._count += 1
        path = export_onnx(model, Path(self._tmp.name) / f"m{self._count}.onnx",
                           self.example_inputs)
        return OrtModule(path, threads=self.threads)

    def __call__(self, candidate: nn.Module) -> float:
        from netpress.measure.latency import measure_latency_interleaved

        ref, cand = measure_latency_interleaved(
            [self.reference, self._runnable(candidate)], self.example_inputs,
            batch_sizes=(self.batch_size,), threads=self.threads, warmup=3,
            repeats=self.repeats, rounds=self.rounds)
        return cand[self.batch_size].median_ms / ref[self.batch_size].median_ms

    def close(self) -> None:
        self._tmp.cleanup()


def search_latency(prune_to: Callable[[float], tuple[nn.Module, dict[str, Any]]],
                   ratio_of: Callable[[nn.Module], float], target: float,
                   *, start_ratio: float = 1.0, rounds: int = 6, tolerance: float = 0.03
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Prune with ``prune_to(macs_fraction)`` until ``ratio_of(model) <= target`` (the
    pruned model's latency as a fraction of the reference's; ``start_ratio`` is the unpruned
    model's, below 1 when an earlier step already pruned it).

    Returns the feasible model with the largest MACs fraction found in ``rounds`` tries
    (stopping early once one lies within ``tolerance`` below the target), and its summary
    extended with the measured points. Raises :class:`RecipeError` when no try meets it.
    """
    points: list[tuple[float, float]] = [(1.0, start_ratio)]
    best: tuple[float, nn.Module, dict[str, Any], float] | None = None
    tried: list[dict[str, float]] = []
    fraction = next_fraction(points, target)
    floor_hit = 0.0  # the largest fraction the floors refused
    for _ in range(rounds):
        try:
            model, summary = prune_to(fraction)
        except RecipeError:  # the floors stop this fraction: try between it and the last
            floor_hit = max(floor_hit, fraction)
            ok = [m for m, _ in points if m > fraction]
            fraction = (fraction + min(ok)) / 2
            continue
        ratio = ratio_of(model)
        tried.append({"macs_fraction": round(fraction, 4), "latency_ratio": round(ratio, 4)})
        points.append((fraction, ratio))
        if ratio <= target and (best is None or fraction > best[0]):
            best = (fraction, model, summary, ratio)
        if best is not None and best[3] >= target * (1 - tolerance):
            break
        # a safeguarded secant step: latency falls as MACs fall, so the answer lies between
        # the largest fast-enough fraction and the smallest too-slow one; a noisy timing can
        # throw the line fit anywhere, so keep the proposal inside that bracket
        slow = min([m for m, r in points if r > target] or [1.0])
        fast = best[0] if best is not None else max(floor_hit, 0.0)
        lo, hi = (fast, slow) if fast < slow else (floor_hit, slow)
        proposal = next_fraction(points, target)
        if best is None:  # nothing fast enough yet: go below every too-slow try
            proposal = min(proposal, 0.9 * hi)
        if not lo < proposal < hi or any(abs(proposal - m) < 1e-3 for m, _ in points):
            proposal = (lo + hi) / 2
        fraction = max(_MIN_FRACTION, proposal)
    if best is None:
        seen = ", ".join(f"{t['macs_fraction']:.0%} MACs -> {t['latency_ratio']:.0%}"
                         for t in tried)
        raise RecipeError(f"StructuredPrune: no pruned model reached {target:.0%} of the "
                          f"reference latency in {rounds} tries ({seen}); raise the latency "
                          f"target, lower floor, or use a macs= target")
    _, model, summary, ratio = best
    summary = dict(summary)
    summary.update({"latency_target": target, "latency_ratio": round(ratio, 4),
                    "latency_tries": tried})
    return model, summary

