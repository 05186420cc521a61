"""What :func:`netpress.search.search` returns: best recipe, trial log, Pareto front."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netpress._atomic import atomic_write
from netpress.config import Recipe
from netpress.search.pareto import pareto_front, pareto_plot, pareto_table

if TYPE_CHECKING:
    import optuna

__all__ = ["SearchResult", "trial_record", "best_so_far"]


def trial_record(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One finished trial as a JSON-ready dict (the trial log's entry)."""
    attrs = t.user_attrs
    return {"number": t.number, "state": t.state.name, "params": dict(t.params),
            "source": attrs.get("source", "sampler"), "budget": attrs.get("budget"),
            "recipe": attrs.get("recipe"), "outcome": attrs.get("outcome")}


def _objective_if_feasible(t: dict[str, Any]) -> float | None:
    o = t.get("outcome") or {}
    return float(o["objective"]) if o.get("feasible") and o.get("objective") is not None \
        else None


def best_so_far(trials: list[dict[str, Any]]) -> list[float | None]:
    """The best feasible objective after each trial (``None`` until one is feasible)."""
    out: list[float | None] = []
    best: float | None = None
    for t in sorted(trials, key=lambda t: t["number"]):
        v = _objective_if_feasible(t)
        if v is not None and (best is None or v < best):
            best = v
        out.append(best)
    return out


@dataclass
class SearchResult:
    """The search's outcome.

    ``best_recipe`` is the best feasible configuration with per-layer settings (and the
    final recovery, if any), ``final`` its full re-evaluation (``final["verified"]``),
    ``trials`` the full trial log and :attr:`pareto` the front of objective vs the first
    constraint's metric.
    """

    objective: str
    unit: str
    constraints: list[str]
    strategy: str
    seed: int
    trials: list[dict[str, Any]]
    seconds: float = 0.0
    best_recipe: Recipe | None = None
    final: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = field(default=None, repr=False)
    task: str = "classification"

    @property
    def best_trial(self) -> dict[str, Any] | None:
        feasible = [t for t in self.trials if _objective_if_feasible(t) is not None]
        return min(feasible, key=lambda t: (_objective_if_feasible(t), t["number"])) \
            if feasible else None

    @property
    def best_value(self) -> float | None:
        best = self.best_trial
        return None if best is None else _objective_if_feasible(best)

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return [dict(t) for t in pareto_front(self.trials)]

    def curve(self) -> list[float | None]:
        """Best feasible objective after each trial."""
        return best_so_far(self.trials)

    def to_dict(self) -> dict[str, Any]:
        best = self.best_trial
        return {"objective": self.objective, "unit": self.unit,
                "constraints": self.constraints, "task": self.task, "strategy": self.strategy,
                "seed": self.seed,
                "seconds": round(self.seconds, 3), "best_trial": None if best is None
                else best["number"], "best_value": self.best_value,
                "best_recipe": None if self.best_recipe is None else self.best_recipe.to_dict(),
                "final": self.final, "curve": self.curve(),
                "pareto": [t["number"] for t in self.pareto], "trials": self.trials}

    def pareto_markdown(self) -> str:
        return pareto_table(self.pareto, self.objective, self.unit)

    def save(self, directory: str | Path, *, plot: bool = True) -> Path:
        """Write ``search.json`` (the full trial log), ``best_recipe.yaml``, ``pareto.md`` and
        (``plot`` and matplotlib installed) ``pareto.png`` into ``directory``."""
        from netpress.report.plots import have_matplotlib

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "search.json", json.dumps(self.to_dict(), indent=2))
        if self.best_recipe is not None:
            atomic_write(d / "best_recipe.yaml", self.best_recipe.to_yaml())
        atomic_write(d / "pareto.md", self.pareto_markdown() + "\n")
        if plot and have_matplotlib():
            atomic_write(d / "pareto.png", pareto_plot(self.trials, self.objective, self.unit,
                                                       title=f"Search ({self.strategy})"))
        return d / "search.json"
