"""Freezing named parameters for the length of a recovery loop.

A recovery method's ``freeze`` patterns name modules or parameters (exact names or ``re:``
patterns matched in full); every parameter they cover has ``requires_grad`` switched off
while the loop runs (so it is neither updated nor given a gradient) and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from netpress.errors import SelectionError
from netpress.select import matches

__all__ = ["frozen", "frozen_names"]


def _prefixes(name: str) -> list[str]:
    """``"a.b.weight"`` -> ``["a", "a.b", "a.b.weight"]``: the modules that own a parameter
    and the parameter itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def frozen_names(model: nn.Module, patterns: Sequence[str], owner: str = "freeze") -> list[str]:
    """Names of the parameters of ``model`` that ``patterns`` cover: a pattern matching a
    module covers every parameter under it, one matching a parameter covers that parameter.
    Raises :class:`SelectionError` naming any pattern that covers nothing."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(matches(pattern, prefix) for n in names for prefix in _prefixes(n)):
            shown = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[:8])
            raise SelectionError(f"{owner}: freeze pattern {pattern!r} matches no module or "
                                 f"parameter of the model; modules with parameters: {shown}, "
                                 "...")
    return [n for n in names
            if any(matches(p, prefix) for p in patterns for prefix in _prefixes(n))]


@contextmanager
def frozen(model: nn.Module, patterns: Sequence[str], owner: str = "freeze") -> Iterator[list[str]]:
    """Switch ``requires_grad`` off for the parameters ``patterns`` cover (see
    :func:`frozen_names`) and yield their names; the previous flags come back on exit."""
    if not patterns:
        yield []
        return
    names = frozen_names(model, patterns, owner)
    params = dict(model.named_parameters())
    before = {n: params[n].requires_grad for n in names}
    try:
        for n in names:
            params[n].requires_grad_(False)
        yield names
    finally:
        for n, flag in before.items():
            params[n].requires_grad_(flag)
