"""Bounded reprs for error messages: a message never prints more than a few lines.

A value from a user's file (a recipe, an artefact header) may be huge or, through YAML
aliases, exponentially large when expanded; ``repr`` of it can take minutes and gigabytes.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["short_repr"]


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without expanding the whole value."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = max(limit, 8)
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 6, 6, 6
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
