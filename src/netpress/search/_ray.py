"""Running trials in parallel on Ray (the optional ``ray`` extra).

The driver keeps the Optuna study (and its journal) and does every ask and tell; workers
only score recipes. The :class:`~netpress.search.evaluate.Evaluator` (model, evaluation
inputs, cached reference outputs) is put in Ray's object store once and shared by all
tasks. ``address="local"`` starts a local Ray instance with ``workers`` CPUs; any other
address (``"auto"``, ``"ray://host:10001"``) joins that cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netpress.config import Recipe
from netpress.errors import NetpressError

if TYPE_CHECKING:
    import optuna

    from netpress.search.evaluate import Evaluator, TrialOutcome
    from netpress.search.space import Space
    from netpress.search.strategies import Strategy, StrategyContext

__all__ = ["run_ray", "import_ray"]


def import_ray() -> Any:
    """``import ray``, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise NetpressError("ray_address= needs Ray: pip install 'netpress[ray]'") from None
    return ray


def _score(evaluator: Evaluator, recipe: dict[str, Any]) -> TrialOutcome:
    return evaluator.run(Recipe.from_dict(recipe))


def run_ray(study: optuna.Study, strategy: Strategy, ctx: StrategyContext,
            dists: dict[str, Any], space: Space, evaluator: Evaluator, trials: int,
            address: str, workers: int, *, progress: bool = False) -> None:
    """Run the search loop with up to ``workers`` trials in flight on Ray."""
    from netpress.search.runner import _ask, _print_trial, _tell, finished_trials

    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        score = ray.remote(num_cpus=1)(_score)
        shared = ray.put(evaluator)
        pending: dict[Any, tuple[Any, Recipe]] = {}
        done = len(finished_trials(study))
        while done < trials or pending:
            while len(pending) < workers and done + len(pending) < trials:
                trial = _ask(study, strategy, ctx, dists)
                recipe = space.build(trial.params)
                pending[score.remote(shared, recipe.to_dict())] = (trial, recipe)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                trial, recipe = pending.pop(ref)
                outcome = ray.get(ref)
                _tell(study, trial, recipe, outcome)
                done += 1
                if progress:
                    _print_trial(trial.number, done, trials, outcome)
    finally:
        if started_here:
            ray.shutdown()
