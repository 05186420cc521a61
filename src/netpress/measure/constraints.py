"""Fidelity constraints that read a measured report.

Each constraint is a small frozen dataclass with ``check(report) -> ConstraintResult``; the
search uses them to decide feasibility, and a person can read why a result failed. They read
the same ``report.json`` structure that :func:`netpress.measure.compare` produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from netpress.errors import DataError, RecipeError

__all__ = [
    "Constraint",
    "ConstraintResult",
    "MinAgreement",
    "MaxAccuracyDrop",
    "MaxClassAgreementDrop",
    "MinCosine",
    "MaxPerplexityRatio",
    "check_all",
]


@dataclass(frozen=True)
class ConstraintResult:
    """Whether a constraint holds, the measured value, and the slack (>= 0 when satisfied)."""

    name: str
    satisfied: bool
    value: float
    bound: float
    slack: float

    def __str__(self) -> str:
        mark = "ok" if self.satisfied else "VIOLATED"
        return f"{self.name}: {self.value:.4f} (bound {self.bound:.4f}) {mark}"


class Constraint(Protocol):
    def check(self, report: Mapping[str, Any]) -> ConstraintResult: ...


def _need(report: Mapping[str, Any], *path: str) -> Any:
    cur: Any = report
    for part in path:
        if not isinstance(cur, Mapping) or cur.get(part) is None:
            raise DataError(f"the report has no {'.'.join(path)}: measure with `evaluate=` "
                            f"(labelled data for accuracy) to check this constraint")
        cur = cur[part]
    return cur


def _check_bound(owner: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"{owner}: the bound {value!r} must be a fraction in [0, 1]")


@dataclass(frozen=True)
class MinAgreement:
    """Top-1 agreement with the reference must be at least ``value`` (e.g. 0.99)."""

    value: float

    def __post_init__(self) -> None:
        _check_bound("MinAgreement", self.value)

    def check(self, report: Mapping[str, Any]) -> ConstraintResult:
        got = float(_need(report, "agreement"))
        return ConstraintResult("agreement", got >= self.value, got, self.value,
                                got - self.value)


@dataclass(frozen=True)
class MaxAccuracyDrop:
    """Reference accuracy minus compressed accuracy must be at most ``value`` (a fraction:
    0.005 is half a point)."""

    value: float

    def __post_init__(self) -> None:
        _check_bound("MaxAccuracyDrop", self.value)

    def check(self, report: Mapping[str, Any]) -> ConstraintResult:
        drop = float(_need(report, "reference", "accuracy")) - float(
            _need(report, "compressed", "accuracy"))
        return ConstraintResult("accuracy_drop", drop <= self.value, drop, self.value,
                                self.value - drop)


@dataclass(frozen=True)
class MaxClassAgreementDrop:
    """Every class's agreement must be at least ``1 - value``: no class may lose more than
    ``value`` of its inputs to prediction flips."""

    value: float

    def __post_init__(self) -> None:
        _check_bound("MaxClassAgreementDrop", self.value)

    def check(self, report: Mapping[str, Any]) -> ConstraintResult:
        worst = float(_need(report, "fidelity", "worst_class_agreement"))
        drop = 1.0 - worst
        return ConstraintResult("class_agreement_drop", drop <= self.value, drop, self.value,
                                self.value - drop)


def _task_metric(report: Mapping[str, Any], key: str, form: str, task: str) -> float:
    """``report["fidelity"][key]``, or a clear error naming the task that gives it."""
    fidelity = report.get("fidelity")
    value = fidelity.get(key) if isinstance(fidelity, Mapping) else None
    if value is None:
        raise DataError(f"constraint {form}: the measured metrics have no {key}; it is "
                        f"measured by the {task} task (give task={task!r} / --task {task}) "
                        f"or use agreement>=X")
    return float(value)


@dataclass(frozen=True)
class MinCosine:
    """The mean cosine similarity of the compressed model's sentence embeddings to the
    reference's must be at least ``value`` (a sentence-embedding task's ``cosine_mean``)."""

    value: float

    def __post_init__(self) -> None:
        if not -1.0 <= self.value <= 1.0:
            raise RecipeError(f"MinCosine: the bound {self.value!r} must lie in [-1, 1]")

    def check(self, report: Mapping[str, Any]) -> ConstraintResult:
        got = _task_metric(report, "cosine_mean", f"cosine>={self.value:g}",
                           "sentence-embedding")
        return ConstraintResult("cosine", got >= self.value, got, self.value, got - self.value)


@dataclass(frozen=True)
class MaxPerplexityRatio:
    """Compressed over reference perplexity on the evaluation text must be at most ``value``
    (e.g. 1.05: at most 5% worse; a language-model task's ``perplexity_ratio``)."""

    value: float

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not 1.0 <= self.value < float("inf"):
            raise RecipeError(f"MaxPerplexityRatio: the bound {self.value!r} must be a finite "
                              f"ratio >= 1 (1.05: perplexity at most 5% above the reference's)")

    def check(self, report: Mapping[str, Any]) -> ConstraintResult:
        got = _task_metric(report, "perplexity_ratio", f"perplexity_ratio<={self.value:g}",
                           "language-model")
        return ConstraintResult("perplexity_ratio", got <= self.value, got, self.value,
                                self.value - got)


def check_all(constraints: list[Constraint] | tuple[Constraint, ...],
              report: Mapping[str, Any]) -> list[ConstraintResult]:
    """Every constraint's result, in order."""
    return [c.check(report) for c in constraints]
