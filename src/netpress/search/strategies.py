"""Search strategies behind one small interface: an Optuna sampler plus optional proposals.

A strategy gives the search loop (:mod:`netpress.search.runner`) two things:

* ``sampler(seed)``: an Optuna sampler for ordinary trials; constrained ones read each
  trial's ``constraints`` user attribute (values <= 0 are satisfied);
* ``propose(study, ctx)``: optionally, the exact parameters of the next trial (enqueued
  before ``ask``), from a read-only look at the finished trials. The knapsack allocator
  proposes this way, alone or as a warm start of the Bayesian search.

Strategies: :class:`GP` (constrained Bayesian optimisation, Optuna's GPSampler),
:class:`TPE`, :class:`RandomSearch`, :class:`Knapsack` (bisection over the error budget
of :func:`netpress.search.allocation.allocate`) and :class:`~netpress.search.rl.RL`
(policy-gradient search with per-layer actions and a reward at every step).
``make_strategy("gp+knapsack")`` is the GP warm-started by three knapsack allocations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from netpress.errors import RecipeError

if TYPE_CHECKING:
    import optuna

    from netpress.search.allocation import SensitivityTable

__all__ = ["Strategy", "StrategyContext", "Proposal", "GP", "TPE", "RandomSearch", "Knapsack",
           "make_strategy", "STRATEGIES", "constraint_values"]

STRATEGIES = ("gp", "tpe", "random", "knapsack", "gp+knapsack", "rl")


def constraint_values(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    """Optuna's ``constraints_func``: the stored violations (<= 0 means satisfied)."""
    return list(trial.user_attrs.get("constraints", [1.0]))


def _constraints_kw() -> dict[str, Any]:
    """Optuna >= 5 reads ``trial.set_constraint`` values itself (``constraints_func`` is
    deprecated there); older versions need the function."""
    import optuna

    if hasattr(optuna.trial.Trial, "set_constraint"):
        return {}
    return {"constraints_func": constraint_values}


@dataclass
class StrategyContext:
    """What a strategy may read: the space, the model and a few evaluation inputs."""

    space: Any
    model: Any
    inputs: list[Any]
    table: SensitivityTable | None = None


@dataclass(frozen=True)
class Proposal:
    params: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler: ...

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None: ...


@dataclass(frozen=True)
class RandomSearch:
    """Independent uniform samples."""

    name: str = "random"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None:
        return None


@dataclass(frozen=True)
class TPE:
    """Optuna's TPE with constraints; ``startup`` random trials first."""

    startup: int = 3
    name: str = "tpe"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup,
                                          multivariate=True, **_constraints_kw())

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None:
        return None


@dataclass(frozen=True)
class Knapsack:
    """Layer-wise allocation by knapsack over measured sensitivities (L-GreCo style).

    The error budget is bisected on a log scale against the measured constraint: double
    it after a feasible trial and shrink it after an infeasible one, converging between
    the largest feasible and the smallest infeasible budget. Needs a
    :class:`~netpress.search.space.LayerwiseSpace`. After ``limit`` proposals (or when the
    bisection only repeats itself) the ``fallback`` sampler takes over.
    """

    start: float = 0.01
    limit: int | None = None
    name: str = "knapsack"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3, multivariate=True,
                                          **_constraints_kw())

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None:
        from netpress.search.allocation import allocate
        from netpress.search.space import LayerwiseSpace

        if not isinstance(ctx.space, LayerwiseSpace) or ctx.table is None:
            raise RecipeError("the knapsack strategy needs a LayerwiseSpace (per-layer or "
                              "grouped sparsity/bits); use gp, tpe or random for other spaces")
        tried = [t for t in study.trials if "budget" in t.user_attrs]
        if self.limit is not None and len(tried) >= self.limit:
            return None
        seen = [t.params for t in study.trials]
        for budget in _budgets(tried, self.start):
            params = allocate(ctx.space, ctx.table, budget)
            if params is not None and params not in seen:
                return Proposal(params, {"budget": budget, "source": "knapsack"})
        return None


def _budgets(tried: list[Any], start: float, steps: int = 12) -> list[float]:
    """Candidate budgets, best first, from the finished knapsack trials' feasibility."""
    ok = [t.user_attrs["budget"] for t in tried if t.user_attrs.get("feasible")]
    bad = [t.user_attrs["budget"] for t in tried if "feasible" in t.user_attrs
           and not t.user_attrs["feasible"]]
    lo = max(ok) if ok else None
    hi = min((b for b in bad if lo is None or b > lo), default=None)
    out = []
    for _ in range(steps):
        if lo is None and hi is None:
            nxt = start
        elif lo is None:
            assert hi is not None
            nxt = hi / 4
        elif hi is None:
            nxt = lo * 4
        else:
            nxt = math.sqrt(lo * hi)
        out.append(nxt)
        # if this budget repeats an allocation, look further on the same side
        if lo is not None and hi is not None:
            hi = nxt
        elif lo is None:
            hi = nxt
        else:
            lo = nxt
    return out


@dataclass(frozen=True)
class GP:
    """Constrained Bayesian optimisation (Optuna's GPSampler with ``constraints_func``).

    ``startup`` random trials first; ``warm_start`` knapsack proposals before those
    (needs a LayerwiseSpace).
    """

    startup: int = 3
    warm_start: int = 0
    name: str = "gp"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=self.startup,
                                         deterministic_objective=True,
                                         **_constraints_kw())

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None:
        if self.warm_start <= 0:
            return None
        return Knapsack(limit=self.warm_start).propose(study, ctx)


def make_strategy(spec: str | Strategy) -> Strategy:
    """A strategy by name (``STRATEGIES``) or as given."""
    if not isinstance(spec, str):
        return spec
    from netpress.search.rl import RL

    table: dict[str, Strategy] = {"gp": GP(), "tpe": TPE(), "random": RandomSearch(),
                                  "knapsack": Knapsack(),
                                  "gp+knapsack": GP(warm_start=3, name="gp+knapsack"),
                                  "rl": RL()}
    if spec not in table:
        raise RecipeError(f"unknown search strategy {spec!r}; choose one of {STRATEGIES}")
    return table[spec]


def needs_table(strategy: Strategy, space: Any = None) -> bool:
    """Whether the strategy reads measured sensitivities: knapsack allocations always, the
    RL strategy's step rewards on a :class:`~netpress.search.space.LayerwiseSpace`."""
    from netpress.search.rl import RL
    from netpress.search.space import LayerwiseSpace

    if isinstance(strategy, RL):
        return isinstance(space, LayerwiseSpace)
    return isinstance(strategy, Knapsack) or (isinstance(strategy, GP) and strategy.warm_start > 0)
