"""One way to select layers: full module names or ``re:`` patterns.

Used everywhere a user points at layers: in recipes, in per-layer settings, and in what the
search emits. A pattern ``"re:layer3\\..*"`` matches module names with ``re.fullmatch``; any
other string is an exact module name. Patterns that match nothing are errors, never silently
ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from torch import nn

from netpress.errors import SelectionError

__all__ = [
    "check_patterns",
    "matches",
    "select_names",
    "resolve_per_layer",
    "weighted_modules",
    "DEFAULT_PRUNABLE",
]

V = TypeVar("V")

#: Layer types whose ``weight`` unstructured pruning selects by default.
DEFAULT_PRUNABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def check_patterns(owner: str, **fields: object) -> None:
    """Raise RecipeError unless every field is a list/tuple of layer names or ``re:`` patterns."""
    from netpress.errors import RecipeError

    for key, value in fields.items():
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{owner}: {key} must be a list of layer names or 're:' patterns, "
                              f"got {value!r}")


def _compile(pattern: str) -> re.Pattern[str] | None:
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except re.error as exc:
        raise SelectionError(f"layer pattern {pattern!r} is not a valid regex: {exc}") from None


def matches(pattern: str, name: str) -> bool:
    """True if ``name`` is ``pattern`` or fully matches the ``re:`` ``pattern``."""
    rx = _compile(pattern)
    return rx.fullmatch(name) is not None if rx is not None else pattern == name


def _preview(names: Sequence[str]) -> str:
    shown = ", ".join(names[:8])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def select_names(
    candidates: Sequence[str],
    include: Iterable[str] = ("re:.*",),
    ignore: Iterable[str] = (),
    *,
    owner: str = "selection",
    what: str = "layer",
) -> list[str]:
    """Candidates matched by any ``include`` pattern and by no ``ignore`` pattern.

    Every pattern must match at least one candidate, else :class:`SelectionError` names it.
    Order follows ``candidates``.
    """
    include, ignore = list(include), list(ignore)
    for pattern in include + ignore:
        if not any(matches(pattern, n) for n in candidates):
            raise SelectionError(
                f"{owner}: {what} pattern {pattern!r} matches no {what}; the {what}s are: "
                f"{_preview(list(candidates)) or '(none)'}"
            )
    chosen = [
        n for n in candidates
        if any(matches(p, n) for p in include) and not any(matches(p, n) for p in ignore)
    ]
    if not chosen:
        raise SelectionError(f"{owner}: the patterns select no {what} (include={include}, "
                             f"ignore={ignore})")
    return chosen


def resolve_per_layer(
    names: Sequence[str],
    overrides: Mapping[str, V],
    default: V,
    *,
    owner: str = "per-layer settings",
) -> dict[str, V]:
    """The value for each name: an exact-name entry wins, then the first matching ``re:``
    entry in the mapping's order, then ``default``. Entries that match no name are errors."""
    out: dict[str, V] = {}
    for key in overrides:
        if not any(matches(key, n) for n in names):
            raise SelectionError(
                f"{owner}: {key!r} matches no selected layer; selected layers are: "
                f"{_preview(list(names))}"
            )
    for n in names:
        if n in overrides:
            out[n] = overrides[n]
            continue
        value = default
        for key, v in overrides.items():
            if key.startswith("re:") and matches(key, n):
                value = v
                break
        out[n] = value
    return out


def weighted_modules(
    model: nn.Module, types: tuple[type[nn.Module], ...] = DEFAULT_PRUNABLE
) -> dict[str, nn.Module]:
    """Named modules of the given types that own a ``weight`` parameter of two or more dims."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, types) and isinstance(w, nn.Parameter) and w.dim() >= 2:
            out[name] = module
    return out
