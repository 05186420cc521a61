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


def check_all(constraints: list[Constraint] | tuple[Constraint, ...],
              report: Mapping[str, Any]) -> list[ConstraintResult]:
    """Every constraint's result, in order."""
    return [c.check(report) for c in constraints]
