"""Scoring one trial: apply the recipe, measure the objective, check the constraints cheaply.

The :class:`Evaluator` holds everything a trial needs (the model, the evaluation inputs in
small chunks, the reference outputs computed once, the objective and constraints) and is
picklable, so the Ray backend ships it to workers once. A trial is:

1. ``compress(model, recipe + [recovery], measure=False)``: the optional short recovery is
   the cheap proxy of the final, fully recovered model;
2. the objective on the compressed model;
3. evaluation chunk by chunk. After each chunk the constraints are checked on an
   **optimistic** report (every input not yet seen assumed to agree with the reference and
   to be classified correctly); once even that report violates a constraint, the trial is
   certainly infeasible on this data and stops (``early_stopped``). No feasible trial is
   ever stopped. A stopped trial records the constraint values measured on the inputs it
   saw (an unbiased estimate, violated too), which is what the samplers learn from.

With a ``task`` (:func:`netpress.measure.tasks.as_task`), the trials are scored by that
task instead of classification: the text tasks (``language-model``,
``sentence-embedding``) batch by batch on the evaluation batches as given, with their own
optimistic bounds (:mod:`netpress.search.text_scoring`); other tasks (``embedding``, a
function) on the concatenated outputs, without early stopping. The constraints read the
task's metrics (``agreement``, and ``cosine`` / ``perplexity_ratio`` for text).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netpress._inputs import take_batch
from netpress.config import MethodConfig, Recipe
from netpress.data import Data, batches
from netpress.errors import DataError, NetpressError
from netpress.measure.collect import outputs_on
from netpress.measure.constraints import Constraint, ConstraintResult, check_all
from netpress.measure.fidelity import classification_fidelity
from netpress.measure.tasks import Task, as_task
from netpress.search.objectives import Objective
from netpress.search.text_scoring import TextScore, TextScorer, is_text_task, task_report

__all__ = ["Evaluator", "TrialOutcome", "optimistic_report", "report_from_metrics",
           "with_recovery"]


@dataclass
class TrialOutcome:
    """What one trial measured (JSON-ready through :meth:`to_dict`)."""

    objective: float | None
    constraints: list[ConstraintResult] = field(default_factory=list)
    early_stopped: bool = False
    n_evaluated: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def feasible(self) -> bool:
        return self.error is None and not self.early_stopped and all(
            c.satisfied for c in self.constraints)

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "feasible": self.feasible,
                "early_stopped": self.early_stopped, "n_evaluated": self.n_evaluated,
                "constraints": [{"name": c.name, "value": c.value, "bound": c.bound,
                                 "satisfied": c.satisfied, "slack": c.slack}
                                for c in self.constraints],
                "metrics": self.metrics, "seconds": round(self.seconds, 3), "error": self.error,
                "worker": self.worker}


def report_from_metrics(m: Mapping[str, Any]) -> dict[str, Any]:
    """The ``report.json`` keys the constraints read, from classification metrics."""
    return {"agreement": m.get("agreement"),
            "reference": {"accuracy": m.get("reference_accuracy")},
            "compressed": {"accuracy": m.get("compressed_accuracy")},
            "fidelity": {"worst_class_agreement": m.get("worst_class_agreement")}}


def optimistic_report(ref_pred: torch.Tensor, cmp_pred_seen: torch.Tensor,
                      labels: torch.Tensor | None) -> dict[str, Any]:
    """Best-case report after seeing the first ``len(cmp_pred_seen)`` of ``len(ref_pred)``
    predictions: unseen inputs agree with the reference and are classified correctly.

    Each value is an upper bound on the final one (agreement, compressed accuracy, worst
    class agreement), so a constraint it violates is violated by the full evaluation too.
    """
    n, seen = int(ref_pred.numel()), int(cmp_pred_seen.numel())
    agree = torch.ones(n, dtype=torch.bool)
    agree[:seen] = cmp_pred_seen == ref_pred[:seen]
    out: dict[str, Any] = {"agreement": float(agree.float().mean())}
    group = labels if labels is not None else ref_pred
    worst = min(float(agree[group == c].float().mean()) for c in torch.unique(group))
    out["fidelity"] = {"worst_class_agreement": worst}
    if labels is not None:
        correct = torch.ones(n, dtype=torch.bool)
        correct[:seen] = cmp_pred_seen == labels[:seen]
        out["reference"] = {"accuracy": float((ref_pred == labels).float().mean())}
        out["compressed"] = {"accuracy": float(correct.float().mean())}
    return out


def with_recovery(recipe: Recipe, recovery: MethodConfig | None) -> Recipe:
    """``recipe`` with ``recovery`` inserted before its first quantization step (recovery
    trains float weights: pruned weights stay pruned, quantized ones would not move), or
    appended when nothing is quantized."""
    if recovery is None:
        return recipe
    from netpress.registry import get_method

    steps = list(recipe)
    at = next((i for i, s in enumerate(steps) if get_method(s).kind == "quantize"), len(steps))
    return Recipe(tuple(steps[:at] + [recovery] + steps[at:]))


def _chunks(data: Data, chunk: int) -> tuple[list[Any], torch.Tensor | None]:
    xs, ys = [], []
    for x, y in batches(data, name="evaluate"):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError("search: the evaluation data is empty")
    labels = None if any(y is None for y in ys) else torch.cat([torch.as_tensor(y).reshape(-1)
                                                                for y in ys])
    if all(isinstance(x, torch.Tensor) for x in xs):
        flat = torch.cat(xs)
        return list(flat.split(chunk)), labels
    return xs, labels


class Evaluator:
    """Scores recipes on ``model`` against its own outputs (see the module docs).

    ``evaluate`` is labelled data (labels may be ``None`` for agreement-only constraints),
    re-chunked into ``chunk`` rows so that hopeless trials stop after the first chunk.
    ``recovery`` (e.g. ``FineTune(max_steps=20)``) is appended to every trial's recipe.
    ``task`` (a :class:`~netpress.measure.tasks.Task` or its name; ``None``: classification)
    decides what the trials measure (see the module docs); text batches are kept as given.
    """

    def __init__(self, model: nn.Module, *, objective: Objective,
                 constraints: Sequence[Constraint], evaluate: Data,
                 calibration: Data | None = None, train: Data | None = None,
                 recovery: MethodConfig | None = None, example_inputs: Any = None,
                 chunk: int = 100, early_stop: bool = True, seed: int = 0,
                 threads: int = 1, task: Task | str | None = None) -> None:
        self.model = model.eval()
        self.objective = objective
        self.constraints = list(constraints)
        self.task: Task | None = None if task is None else as_task(task)
        if self.task is not None and self.task.name == "classification":
            self.task = None  # the classification path below, with its early stop
        self.scorer: TextScorer | None = None
        if self.task is not None and is_text_task(self.task):
            pairs = list(batches(evaluate, name="evaluate"))
            self.scorer = TextScorer(self.task, pairs)
            self.inputs, self.labels = [x for x, _ in pairs], None
        else:
            self.inputs, self.labels = _chunks(evaluate, chunk)
        self.calibration, self.train, self.recovery = calibration, train, recovery
        self.example_inputs = example_inputs if example_inputs is not None else take_batch(
            self.inputs[0], 1)
        self.early_stop, self.seed, self.threads = early_stop, seed, threads
        self._ref: torch.Tensor | None = None

    def _outputs(self, model: nn.Module, x: Any) -> torch.Tensor:
        return outputs_on(model, [x])

    @property
    def task_name(self) -> str:
        """The task the trials are scored by (``"classification"`` by default)."""
        return "classification" if self.task is None else str(self.task.name)

    def prepare(self) -> None:
        """Run the reference model once on the evaluation data (before the first trial)."""
        if self.scorer is not None:
            self.scorer.prepare(self.model)
        else:
            self.reference_outputs()

    def reference_outputs(self) -> torch.Tensor:
        """The reference model's outputs on the evaluation inputs (computed once)."""
        if self._ref is None:
            self._ref = torch.cat([self._outputs(self.model, x) for x in self.inputs])
        return self._ref

    def compress(self, recipe: Recipe, *, recovery: MethodConfig | None = None) -> nn.Module:
        from netpress.api import compress

        return compress(self.model, with_recovery(recipe, recovery),
                        example_inputs=self.example_inputs, calibration=self.calibration,
                        train=self.train, measure=False, seed=self.seed, progress=False).model

    def run(self, recipe: Recipe, *, proxy: bool = True,
            early_stop: bool | None = None) -> TrialOutcome:
        """Score ``recipe``, with this evaluator's short recovery appended when ``proxy``."""
        started = time.perf_counter()
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._run(recipe, self.recovery if proxy else None,
                             self.early_stop if early_stop is None else early_stop, started)
        except NetpressError as exc:
            return TrialOutcome(objective=None, error=f"{type(exc).__name__}: {exc}",
                                seconds=time.perf_counter() - started)
        finally:
            torch.set_num_threads(before)

    def _run(self, recipe: Recipe, recovery: MethodConfig | None, early_stop: bool,
             started: float) -> TrialOutcome:
        if self.task is not None:
            return self._run_task(recipe, recovery, early_stop, started)
        ref = self.reference_outputs()
        ref_pred = ref.argmax(-1)
        model = self.compress(recipe, recovery=recovery)
        value = self.objective.measure(model, with_recovery(recipe, recovery),
                                       self.example_inputs)
        outs: list[torch.Tensor] = []
        for x in self.inputs:
            outs.append(self._outputs(model, x))
            seen = torch.cat(outs)
            if early_stop and seen.shape[0] < ref.shape[0]:
                bound = optimistic_report(ref_pred, seen.argmax(-1), self.labels)
                if not all(r.satisfied for r in check_all(self.constraints, bound)):
                    # the samplers learn from the estimate on the inputs seen, not the bound
                    n = seen.shape[0]
                    part = classification_fidelity(
                        ref[:n], seen, None if self.labels is None else self.labels[:n])
                    return TrialOutcome(
                        objective=value, early_stopped=True, n_evaluated=int(n),
                        constraints=check_all(self.constraints, report_from_metrics(part)),
                        metrics={**_headline(part), "optimistic": bound},
                        seconds=time.perf_counter() - started)
        cmp = torch.cat(outs)
        m = classification_fidelity(ref, cmp, self.labels)
        results = check_all(self.constraints, report_from_metrics(m))
        return TrialOutcome(objective=value, constraints=results, n_evaluated=int(cmp.shape[0]),
                            metrics=_headline(m), seconds=time.perf_counter() - started)


    def _run_task(self, recipe: Recipe, recovery: MethodConfig | None, early_stop: bool,
                  started: float) -> TrialOutcome:
        """A trial scored by ``self.task`` (text tasks batch by batch, see the module docs)."""
        assert self.task is not None
        model = self.compress(recipe, recovery=recovery)
        value = self.objective.measure(model, with_recovery(recipe, recovery),
                                       self.example_inputs)
        if self.scorer is not None:
            score = self.scorer.score(self.model, model, self.constraints,
                                      early_stop=early_stop)
        else:  # a task without batch-by-batch scoring: every output, no early stop
            ref = self.reference_outputs()
            cmp = torch.cat([self._outputs(model, x) for x in self.inputs])
            score = TextScore(self.task.compare(ref, cmp, self.labels), int(cmp.shape[0]))
        m, n, stopped = score.metrics, score.n_evaluated, score.early_stopped
        metrics: dict[str, Any] = {**self.task.headline(m), **{
            k: m[k] for k in ("agreement", "cosine_mean", "perplexity_ratio") if k in m}}
        if score.optimistic is not None:
            metrics["optimistic"] = score.optimistic
        return TrialOutcome(objective=value, early_stopped=stopped, n_evaluated=n,
                            constraints=check_all(self.constraints, task_report(m)),
                            metrics=metrics, seconds=time.perf_counter() - started)


def _headline(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("agreement", "reference_accuracy", "compressed_accuracy",
                              "accuracy_drop", "worst_class_agreement", "kl_mean")}
