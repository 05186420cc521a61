"""Exceptions raised by netpress.

Every error names what is wrong (the module, layer, op, key or file) and what to do about it.
All derive from :class:`NetpressError` so callers can catch them in one place.
"""

from __future__ import annotations

__all__ = [
    "NetpressError",
    "RecipeError",
    "SelectionError",
    "DataError",
    "ModelError",
    "ArtefactError",
]


class NetpressError(Exception):
    """Base class of every error netpress raises on purpose."""


class RecipeError(NetpressError, ValueError):
    """A recipe or method config is invalid: unknown method, unknown key, value out of range."""


class SelectionError(NetpressError, ValueError):
    """A layer name or ``re:`` pattern matched nothing, or matched a layer of the wrong kind."""


class DataError(NetpressError, ValueError):
    """A data argument is missing, empty, malformed, or does not fit the model."""


class ModelError(NetpressError, ValueError):
    """The model cannot be compressed as given (NaN/Inf weights, unsupported layer, ...)."""


class ArtefactError(NetpressError, ValueError):
    """A compressed artefact is truncated, corrupted, of an unknown version, or not netpress's."""
