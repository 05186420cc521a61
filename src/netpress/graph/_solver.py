"""Solving for size attributes: pure arithmetic on the expressions of :mod:`.sizes`."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Expr", "OPS", "evaluate", "leaves", "solve_sizes"]

# ("attr", i) | ("dim", tensor id, dim) | ("const", v) | (op, a, b) | ("neg", a)
Expr = tuple[Any, ...]
OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv,
    "%": operator.mod,
}


def evaluate(expr: Expr, values: Callable[[Expr], int]) -> int:
    """The value of ``expr`` with its leaves (``attr``/``dim``) given by ``values``."""
    kind = expr[0]
    if kind == "const":
        return int(expr[1])
    if kind in ("attr", "dim"):
        return values(expr)
    if kind == "neg":
        return -evaluate(expr[1], values)
    return OPS[kind](evaluate(expr[1], values), evaluate(expr[2], values))


def leaves(expr: Expr, kind: str = "attr") -> set[Expr]:
    if expr[0] == kind:
        return {expr}
    if expr[0] in ("const", "attr", "dim"):
        return set()
    return set().union(*(leaves(e, kind) for e in expr[1:]))


def solve_sizes(constraints: Iterable[tuple[Expr, int]], old: Sequence[int],
                dims: Callable[[Expr], int]) -> tuple[dict[int, int], list[tuple[Expr, int]]]:
    """New attribute values (by address index) under which every ``expr`` evaluates to its
    required value, attributes changing only where they must.

    ``old[i]`` is attribute ``i``'s current value, ``dims`` the new size of a ``dim`` leaf.
    Attributes are solved one at a time, each against every constraint in which it is the
    only unknown left, by search over ``1..old`` (sizes only shrink): its current value if
    that fits, else the smallest that does. Returns the changed values and the constraints
    that could not be met.
    """
    constraints = [(e, int(v)) for e, v in constraints]
    attrs = [{a[1] for a in leaves(e)} for e, _ in constraints]
    known: dict[int, int] = {}
    while True:
        ready = {next(iter(u - set(known))) for u in attrs if len(u - set(known)) == 1}
        if not ready:
            break
        for a in sorted(ready):
            group = [c for c, u in zip(constraints, attrs) if a in u and u - set(known) == {a}]
            found = _search(group, a, old[a], known, dims)
            known[a] = old[a] if found is None else found
    for u in attrs:  # attributes no constraint pins down alone keep their value
        for a in u:
            known.setdefault(a, old[a])

    def value(leaf: Expr) -> int:
        return known[leaf[1]] if leaf[0] == "attr" else dims(leaf)

    failed = [(e, w) for e, w in constraints if _safe_eval(e, value) != w]
    return {a: v for a, v in known.items() if v != old[a]}, failed


def _safe_eval(expr: Expr, values: Callable[[Expr], int]) -> int | None:
    try:
        return evaluate(expr, values)
    except (ZeroDivisionError, KeyError):
        return None


def _search(group: list[tuple[Expr, int]], attr: int, current: int, known: dict[int, int],
            dims: Callable[[Expr], int]) -> int | None:
    def fits(v: int) -> bool:
        def values(leaf: Expr) -> int:
            if leaf[0] == "dim":
                return dims(leaf)
            return v if leaf[1] == attr else known[leaf[1]]
        return all(_safe_eval(e, values) == w for e, w in group)

    if fits(current):
        return current
    return next((v for v in range(1, max(1, current) + 1) if fits(v)), None)
