"""``search(...)``: the ask/tell loop, the journal, the final verification.

Every finished trial is written to an Optuna journal (``journal=path``, a JSON-lines file)
before the next one starts, so a search stopped by Ctrl-C, a crash or SIGKILL resumes where
it was: finished trials are read back, and each trial that was running when the process died
is dealt with exactly once. If its outcome had reached the journal (the process died between
recording it and ``study.tell``), it is told now from the journal, not run again; otherwise
it is marked failed and its parameters are queued again, once (the queued trial names the one
it replaces, so a second interruption does not queue them twice). The loop continues until
``trials`` trials have finished. A journal remembers its space, objective and constraints;
resuming it with others is an error.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netpress.config import MethodConfig, Recipe
from netpress.data import Data
from netpress.errors import RecipeError
from netpress.measure.constraints import Constraint
from netpress.search.evaluate import Evaluator, TrialOutcome, with_recovery
from netpress.search.objectives import Objective, constraint_label, get_objective, parse_constraint
from netpress.search.result import SearchResult, trial_record
from netpress.search.space import Choice, Domain, Range, Space, space_fingerprint
from netpress.search.strategies import Strategy, StrategyContext, make_strategy, needs_table
from netpress.search.text_scoring import check_constraints_fit

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from netpress.measure.tasks import Task

__all__ = ["search", "to_distribution", "open_study", "finished_trials"]

STUDY = "netpress-search"


def to_distribution(dom: Domain) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a :class:`Range` or :class:`Choice`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dom, Choice):
        return CategoricalDistribution(list(dom.options))
    assert isinstance(dom, Range)
    if dom.is_int:
        return IntDistribution(int(dom.low), int(dom.high), log=dom.log,
                               step=int(dom.step or 1))
    return FloatDistribution(float(dom.low), float(dom.high), log=dom.log, step=dom.step)


def open_study(journal: str | Path | None, sampler: optuna.samplers.BaseSampler,
               identity: dict[str, Any]) -> optuna.Study:
    """A study in memory, or in the journal at ``journal`` (created or resumed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: Any = None
    if journal is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(journal).parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(os.fspath(journal)))
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    known = study.user_attrs.get("identity")
    if known is None:
        study.set_user_attr("identity", identity)
    elif known != identity:
        diff = sorted(k for k in identity if known.get(k) != identity[k])
        raise RecipeError(f"journal {journal}: it holds a different search (differs in "
                          f"{', '.join(diff)}); use a new journal path or the same settings")
    return study


def _requeue_stale(study: optuna.Study) -> int:
    """Trials left RUNNING by a dead process, each handled exactly once: told from its
    journaled outcome when it has one, else failed with its params queued again (once)."""
    from optuna.trial import Trial, TrialState

    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    queued = {t.user_attrs.get("requeued_from") for t in trials}
    for t in stale:
        if "outcome" in t.user_attrs and "recipe" in t.user_attrs:
            trial = Trial(study, t._trial_id)
            _record(trial, t.user_attrs["recipe"], t.user_attrs["outcome"])
            _close(study, trial, t.user_attrs["outcome"])
            continue
        if t.params and t.number not in queued:
            attrs = {k: v for k, v in t.user_attrs.items() if k in ("budget", "source")}
            study.enqueue_trial(t.params, user_attrs={**attrs, "requeued_from": t.number})
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to the end (feasible, infeasible, stopped early or failed by error)."""
    return [t for t in study.get_trials(deepcopy=False) if "outcome" in t.user_attrs]


def _record(trial: optuna.Trial, recipe: dict[str, Any], outcome: dict[str, Any]) -> None:
    """Journal what a trial measured (idempotent: a resumed process may write it again)."""
    trial.set_user_attr("recipe", recipe)
    trial.set_user_attr("outcome", outcome)
    trial.set_user_attr("feasible", bool(outcome["feasible"]))
    violations = [-float(c["slack"]) for c in outcome["constraints"]] or [0.0]
    trial.set_user_attr("constraints", violations)
    if hasattr(trial, "set_constraint"):
        with warnings.catch_warnings():  # a resumed trial may have them already: same values
            warnings.filterwarnings("ignore", message=".*constraint.*already set")
            for i, v in enumerate(violations):
                trial.set_constraint(f"c{i}", float(v))


def _close(study: optuna.Study, trial: optuna.Trial, outcome: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    if outcome["error"] is not None or outcome["objective"] is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, outcome["objective"])


def _tell(study: optuna.Study, trial: optuna.Trial, recipe: Recipe,
          outcome: TrialOutcome) -> None:
    record = outcome.to_dict()
    _record(trial, recipe.to_dict(), record)
    _close(study, trial, record)


def _ask(study: optuna.Study, strategy: Strategy, ctx: StrategyContext,
         dists: dict[str, Any]) -> optuna.Trial:
    proposal = strategy.propose(study, ctx)
    if proposal is not None:
        study.enqueue_trial(proposal.params, user_attrs=proposal.attrs)
    return study.ask(dists)


def _prepare_table(strategy: Strategy, study: optuna.Study, ctx: StrategyContext,
                   table: Any, progress: bool = False) -> None:
    from netpress.search.allocation import SensitivityTable, measure_table

    if not needs_table(strategy, ctx.space):
        return
    if table is not None:
        ctx.table = table
    elif "sensitivity" in study.user_attrs:
        ctx.table = SensitivityTable.from_dict(study.user_attrs["sensitivity"])
    else:
        ctx.table = measure_table(ctx.model, ctx.space, ctx.inputs, progress=progress)
    study.set_user_attr("sensitivity", ctx.table.to_dict())


def search(
    model: nn.Module,
    space: Space,
    *,
    objective: str | Objective = "size",
    constraints: Sequence[Constraint | str] = (),
    trials: int = 10,
    strategy: str | Strategy = "auto",
    evaluate: Data,
    calibration: Data | None = None,
    train: Data | None = None,
    recovery: MethodConfig | None = None,
    final_recovery: MethodConfig | None = None,
    verify: Data | None = None,
    example_inputs: Any = None,
    seed: int = 0,
    journal: str | Path | None = None,
    ray_address: str | None = None,
    workers: int = 2,
    threads: int = 1,
    chunk: int = 100,
    early_stop: bool = True,
    sensitivity_batches: int = 1,
    table: Any = None,
    progress: bool = False,
    task: Task | str | None = None,
) -> SearchResult:
    """Search ``space`` for the recipe minimising ``objective`` under ``constraints``.

    Each trial applies the recipe (plus the short ``recovery``, if any) to a copy of
    ``model`` and is scored on ``evaluate`` (a few labelled batches: the cheap proxy), with
    hopeless trials stopped early. The best feasible recipe is then rebuilt with
    ``final_recovery`` and verified on ``verify`` (default: ``evaluate``) without early
    stopping. ``journal`` makes the search resumable; ``ray_address`` (``"local"`` starts a
    local Ray instance with ``workers`` CPUs) runs ``workers`` trials at a time.
    Objectives are minimised; constraints are objects or text (``"agreement>=0.99"``).
    ``strategy="auto"`` is ``gp+knapsack`` on a :class:`LayerwiseSpace` (the only strategy that
    met the benchmark's 10-trial goal on every seed, see BENCHMARKS.md) and ``gp`` otherwise.
    ``task`` (``None``: classification, as always) scores the trials with another task:
    ``"sentence-embedding"`` or ``"language-model"`` for text batches (dicts of
    ``input_ids``/``attention_mask``), whose constraints may also be ``cosine>=X`` (mean
    cosine of the sentence embeddings) and ``perplexity_ratio<=X``; a constraint the task
    does not measure is refused before the first trial.
    """
    if trials < 1:
        raise RecipeError(f"search: trials={trials!r} must be >= 1")
    obj = get_objective(objective, threads=threads)
    cons = [parse_constraint(c) if isinstance(c, str) else c for c in constraints]
    if strategy == "auto":
        from netpress.search.space import LayerwiseSpace

        strategy = "gp+knapsack" if isinstance(space, LayerwiseSpace) else "gp"
    strat = make_strategy(strategy)
    evaluator = Evaluator(model, objective=obj, constraints=cons, evaluate=evaluate,
                          calibration=calibration, train=train, recovery=recovery,
                          example_inputs=example_inputs, chunk=chunk, early_stop=early_stop,
                          seed=seed, threads=threads, task=task)
    check_constraints_fit(cons, evaluator.task)
    identity = {"space": space_fingerprint(space), "objective": repr(obj),
                "constraints": [constraint_label(c) for c in cons], "strategy": strat.name,
                "seed": seed, "recovery": None if recovery is None else recovery.to_dict()}
    if evaluator.task is not None:  # journals of classification searches stay as they were
        identity["task"] = repr(evaluator.task)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental feature.*")
        sampler = strat.sampler(seed)
    study = open_study(journal, sampler, identity)
    requeued = _requeue_stale(study)
    if requeued and progress:
        print(f"search: resumed; {requeued} interrupted trial(s) queued again")
    ctx = StrategyContext(space=space, model=evaluator.model,
                          inputs=evaluator.inputs[:sensitivity_batches])
    _prepare_table(strat, study, ctx, table, progress)
    dists = {k: to_distribution(v) for k, v in space.params.items()}
    evaluator.prepare()
    if progress:
        print(f"search: {trials} trial(s) with strategy {strat.name}; a line per finished "
              f"trial …", flush=True)
    started = time.perf_counter()
    if ray_address is not None:
        from netpress.search._ray import run_ray

        run_ray(study, strat, ctx, dists, space, evaluator, trials, ray_address, workers,
                progress=progress)
    else:
        _run_local(study, strat, ctx, dists, space, evaluator, trials, progress=progress)
    elapsed = time.perf_counter() - started
    records = [trial_record(t) for t in finished_trials(study)]
    result = SearchResult(objective=obj.name, unit=obj.unit,
                          constraints=[constraint_label(c) for c in cons], strategy=strat.name,
                          seed=seed, trials=records, seconds=elapsed,
                          sensitivity=None if ctx.table is None else ctx.table.to_dict(),
                          task=evaluator.task_name)
    if progress and result.best_trial is not None:
        print("search: rebuilding and verifying the best configuration …", flush=True)
    _finish(result, space, evaluator, final_recovery, verify, chunk)
    return result


def _run_local(study: optuna.Study, strategy: Strategy, ctx: StrategyContext,
               dists: dict[str, Any], space: Space, evaluator: Evaluator, trials: int, *,
               progress: bool) -> None:
    while len(finished_trials(study)) < trials:
        trial = _ask(study, strategy, ctx, dists)
        recipe = space.build(trial.params)
        outcome = evaluator.run(recipe)
        _tell(study, trial, recipe, outcome)
        if progress:
            _print_trial(trial.number, len(finished_trials(study)), trials, outcome)


def _print_trial(number: int, done: int, total: int, outcome: TrialOutcome) -> None:
    state = "feasible" if outcome.feasible else ("stopped early" if outcome.early_stopped
                                                 else "infeasible")
    cons = ", ".join(f"{c.name}={c.value:.4f}" for c in outcome.constraints)
    print(f"trial {number} ({done}/{total} done): objective={outcome.objective} {state} ({cons}) "
          f"{outcome.seconds:.1f}s", flush=True)


def _finish(result: SearchResult, space: Space, evaluator: Evaluator,
            final_recovery: MethodConfig | None, verify: Data | None, chunk: int) -> None:
    best = result.best_trial
    if best is None:
        warnings.warn("search: no feasible configuration was found; relax the constraints, "
                      "narrow the space or run more trials", stacklevel=3)
        return
    last = final_recovery if final_recovery is not None else evaluator.recovery
    recipe = with_recovery(space.build(best["params"]), last)
    checker = evaluator
    if verify is not None:
        checker = Evaluator(evaluator.model, objective=evaluator.objective,
                            constraints=evaluator.constraints, evaluate=verify,
                            calibration=evaluator.calibration, train=evaluator.train,
                            example_inputs=evaluator.example_inputs, chunk=chunk,
                            seed=evaluator.seed, threads=evaluator.threads,
                            task=evaluator.task)
    outcome = checker.run(recipe, proxy=False, early_stop=False)
    result.best_recipe = recipe
    result.final = {**outcome.to_dict(), "verified": outcome.feasible}
