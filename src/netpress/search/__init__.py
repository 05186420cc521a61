"""Automatic compression search: state an objective and constraints, get per-layer settings.

>>> from netpress.search import Choice, LayerwiseSpace, Range, search
>>> space = LayerwiseSpace(model, sparsity=Range(0.0, 0.9, step=0.05),
...                        bits=Choice([4, 8]))                            # doctest: +SKIP
>>> result = search(model, space, objective="size", constraints=["agreement>=0.99"],
...                 trials=10, evaluate=loader)                           # doctest: +SKIP
>>> result.best_recipe.save("best.yaml"); result.save("search-out")      # doctest: +SKIP

Optuna (the ``search`` extra) is imported only when a search runs; Ray (the ``ray`` extra)
only with ``ray_address=``.
"""

from netpress.search.allocation import RuleSpace, allocate, knapsack, measure_table
from netpress.search.evaluate import Evaluator, TrialOutcome
from netpress.search.objectives import (
    Latency,
    Macs,
    Params,
    Size,
    get_objective,
    parse_constraint,
)
from netpress.search.pareto import pareto_front, pareto_indices
from netpress.search.result import SearchResult
from netpress.search.rl import RL
from netpress.search.runner import search
from netpress.search.space import Choice, LayerwiseSpace, Range, RecipeSpace, Step, load_space
from netpress.search.strategies import GP, TPE, Knapsack, RandomSearch, make_strategy

__all__ = [
    "search",
    "SearchResult",
    "Range",
    "Choice",
    "Step",
    "RecipeSpace",
    "LayerwiseSpace",
    "RuleSpace",
    "load_space",
    "Size",
    "Macs",
    "Params",
    "Latency",
    "get_objective",
    "parse_constraint",
    "GP",
    "TPE",
    "RandomSearch",
    "Knapsack",
    "RL",
    "make_strategy",
    "Evaluator",
    "TrialOutcome",
    "knapsack",
    "allocate",
    "measure_table",
    "pareto_front",
    "pareto_indices",
]
