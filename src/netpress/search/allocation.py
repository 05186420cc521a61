"""Layer-wise allocation under an error budget (L-GreCo style), and a sensitivity rule space.

Each group of layers picks one option (a sparsity and a bit width). The option's *cost* is
an analytic size (ideal coding of the pruning mask plus ``bits`` per kept weight) and its
*error* the measured relative output error when only that group is compressed
(:mod:`netpress.search.sensitivity`), pruning and quantization errors added. Errors add up
approximately over groups, so the cheapest allocation whose summed error stays within a
budget is a multiple-choice knapsack, solved exactly on a discretised budget by
:func:`knapsack`. Sweeping the budget traces the size/fidelity trade-off; the
``knapsack`` strategy bisects it against the real constraint, and can warm-start BO.

:class:`RuleSpace` is the low-dimensional alternative: a global sparsity plus a strength
that moves sparsity from sensitive groups to robust ones (two knobs for any depth).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from netpress.config import Recipe
from netpress.errors import RecipeError
from netpress.search.sensitivity import group_sensitivity, prune_weight, quantize_weight
from netpress.search.space import Choice, Domain, LayerwiseSpace, Range

__all__ = ["knapsack", "option_cost", "SensitivityTable", "measure_table", "allocate",
           "RuleSpace", "rule_sparsities"]


def knapsack(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
             budget: float, *, bins: int = 2000) -> list[int] | None:
    """The option index per group minimising total cost with total error <= ``budget``.

    Errors are rounded **up** to ``budget / bins`` steps, so the returned allocation
    respects the budget exactly; ``None`` when no allocation fits.
    """
    if budget < 0 or len(costs) != len(errors):
        raise ValueError("knapsack: need budget >= 0 and one cost row per error row")
    unit = budget / bins if budget > 0 else math.inf  # budget 0: only error-free options
    inf = math.inf
    dp = np.full(bins + 1, inf)
    dp[0] = 0.0
    picks: list[np.ndarray] = []
    for c_row, e_row in zip(costs, errors):
        new = np.full(bins + 1, inf)
        pick = np.full(bins + 1, -1, dtype=np.int64)
        for o, (c, e) in enumerate(zip(c_row, e_row)):
            w = 0 if e <= 0 else bins + 1 if unit == math.inf else int(math.ceil(e / unit - 1e-12))
            if w > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[w:] = dp[: bins + 1 - w] + c
            better = cand < new
            new[better], pick[better] = cand[better], o
        dp = new
        picks.append(pick)
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        return None
    choice: list[int] = []
    for g in range(len(costs) - 1, -1, -1):
        o = int(picks[g][end])
        choice.append(o)
        e = errors[g][o]
        end -= 0 if e <= 0 else int(math.ceil(e / unit - 1e-12))  # unit finite when e > 0
    return choice[::-1]


def option_cost(numel: int, sparsity: float, bits: float) -> float:
    """Ideal bytes of a layer: the mask's binary entropy plus ``bits`` per kept weight."""
    s = min(max(sparsity, 0.0), 1.0)
    h = 0.0 if s in (0.0, 1.0) else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))
    return numel * (h + (1 - s) * bits) / 8.0


def _values(dom: Domain | None, points: int) -> list[Any]:
    if dom is None:
        return [None]
    return list(dom.options) if isinstance(dom, Choice) else dom.grid(points)


@dataclass
class SensitivityTable:
    """Measured errors per group: ``prune[g][str(s)]`` and ``quant[g][str(b)]``."""

    prune: dict[str, dict[str, dict[str, float]]]
    quant: dict[str, dict[str, dict[str, float]]]

    def to_dict(self) -> dict[str, Any]:
        return {"prune": self.prune, "quant": self.quant}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityTable:
        return cls(dict(d["prune"]), dict(d["quant"]))


def _thin(values: list[Any], points: int) -> list[Any]:
    """At most ``points`` of ``values``, evenly spaced, first and last kept (the knapsack
    interpolates the errors in between)."""
    if len(values) <= points or points < 2:
        return values
    return [values[round(i * (len(values) - 1) / (points - 1))] for i in range(points)]


def measure_table(model: nn.Module, space: LayerwiseSpace, inputs: Sequence[Any], *,
                  points: int = 8, progress: bool = False) -> SensitivityTable:
    """Pruning and quantization sensitivity of every group of ``space`` on ``inputs``;
    ``progress`` prints a status line and, on a terminal, a progress bar over the probes."""
    from netpress._progress import progress_bar, progress_enabled

    s_opts = _thin([s for s in _values(space.sparsity, points) if s is not None], points)
    b_opts = [b for b in _values(space.bits, points) if b is not None]
    probes = len(space.groups) * (len(s_opts) + len(b_opts))
    if progress:
        print(f"search: measuring the sensitivity of {len(space.groups)} layer group(s) to "
              f"{len(s_opts)} sparsities and {len(b_opts)} bit widths ({probes} probes) …",
              flush=True)
    with progress_bar(probes, "sensitivity probes", progress and progress_enabled(None)) as bar:
        prune = group_sensitivity(model, inputs, space.groups, s_opts, prune_weight,
                                  advance=bar) if s_opts else {}
        quant = group_sensitivity(
            model, inputs, space.groups, b_opts,
            lambda w, b: quantize_weight(w, int(b), space.weight_observer),
            advance=bar) if b_opts else {}
    return SensitivityTable(prune, quant)


def _interp(table: Mapping[str, Mapping[str, float]], x: float) -> float:
    pts = sorted((float(k), v["error"]) for k, v in table.items())
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return float(np.interp(x, xs, ys))


def allocate(space: LayerwiseSpace, table: SensitivityTable, budget: float, *,
             points: int = 19) -> dict[str, Any] | None:
    """Parameter values for ``space`` (``{"sparsity[g]": s, "bits[g]": b}``) of the cheapest
    allocation whose summed measured error is at most ``budget``; ``None`` if none fits."""
    s_opts = _values(space.sparsity, points)
    b_opts = _values(space.bits, points)
    combos = [(s, b) for s in s_opts for b in b_opts]
    costs, errors = [], []
    for g, members in space.groups.items():
        numel = sum(space.layer_sizes[n] for n in members)
        costs.append([option_cost(numel, s or 0.0, 32 if b is None else b) for s, b in combos])
        errors.append([(0.0 if s is None else _interp(table.prune[g], s))
                       + (0.0 if b is None else table.quant[g][str(b)]["error"]
                          if str(b) in table.quant[g] else _interp(table.quant[g], b))
                       for s, b in combos])
    pick = knapsack(costs, errors, budget)
    if pick is None:
        return None
    out: dict[str, Any] = {}
    for g, o in zip(space.groups, pick):
        s, b = combos[o]
        if s is not None:
            out[f"sparsity[{g}]"] = s
        if b is not None:
            out[f"bits[{g}]"] = int(b) if isinstance(b, (int, float)) and float(b).is_integer() \
                else b
    return out


# --------------------------------------------------------------------------- rule space


def rule_sparsities(global_sparsity: float, strength: float,
                    sensitivity: Mapping[str, float], *, cap: float = 0.98) -> dict[str, float]:
    """Per-group sparsity ``g * (1 + strength * (1 - 2 r))`` clipped to ``[0, cap]``, where
    ``r`` in [0, 1] is the group's sensitivity rank (0 = least sensitive prunes most)."""
    order = sorted(sensitivity, key=lambda k: sensitivity[k])
    n = len(order)
    ranks = {k: (i / (n - 1) if n > 1 else 0.5) for i, k in enumerate(order)}
    return {k: round(min(max(global_sparsity * (1 + strength * (1 - 2 * ranks[k])), 0.0), cap),
                     4) for k in sensitivity}


class RuleSpace:
    """Two knobs for any depth: ``global`` sparsity and ``strength`` of a sensitivity rule.

    ``sensitivity`` maps each group of ``layers`` (a :class:`LayerwiseSpace`'s groups) to its
    pruning error at a probe sparsity; ``bits`` (optional) adds one global bit width.
    """

    def __init__(self, layers: LayerwiseSpace, sensitivity: Mapping[str, float], *,
                 global_sparsity: Range = Range(0.0, 0.9),  # noqa: B008
                 strength: Range = Range(0.0, 1.0),  # noqa: B008
                 bits: Choice | Range | None = None) -> None:
        missing = sorted(set(layers.groups) - set(sensitivity))
        if missing:
            raise RecipeError(f"RuleSpace: no sensitivity for group(s) {missing}")
        self.layers, self.sensitivity = layers, dict(sensitivity)
        self.global_sparsity, self.strength, self.bits = global_sparsity, strength, bits

    @property
    def params(self) -> dict[str, Domain]:
        out: dict[str, Domain] = {"global": self.global_sparsity, "strength": self.strength}
        if self.bits is not None:
            out["bits"] = self.bits
        return out

    def build(self, values: Mapping[str, Any]) -> Recipe:
        from netpress.prune.unstructured import LayerwiseMagnitudePrune
        from netpress.quant.lowbit import WeightOnly

        per_group = rule_sparsities(float(values["global"]), float(values["strength"]),
                                    self.sensitivity)
        per = {n: per_group[g] for g, ms in self.layers.groups.items() for n in ms}
        steps: list[Any] = [LayerwiseMagnitudePrune(sparsity=0.0, layers=tuple(per),
                                                    per_layer=per)]
        if self.bits is not None:
            steps.append(WeightOnly(bits=int(values["bits"]), layers=tuple(per),
                                    weight_observer=self.layers.weight_observer))
        return Recipe(tuple(steps))

    def describe(self) -> dict[str, Any]:
        return {"space": "rule", "layers": self.layers.describe(),
                "sensitivity": self.sensitivity, "global": self.global_sparsity.to_dict(),
                "strength": self.strength.to_dict(),
                "bits": None if self.bits is None else self.bits.to_dict()}
