"""The compressed artefact (``.npress``): save a model with its recipe, load it without code.

>>> from netpress.export import save_artefact, load_artefact  # doctest: +SKIP
>>> save_artefact("model.npress", compressed, recipe=recipe.to_dict())  # doctest: +SKIP
>>> model = load_artefact("model.npress").model  # doctest: +SKIP
>>> model_digest("a.npress") == model_digest("b.npress")  # same model?  # doctest: +SKIP

See :mod:`netpress.export.checkpoint` for the layout, :mod:`~netpress.export.codec` for the
tensor encodings, :mod:`~netpress.export.modules` and :mod:`~netpress.export.graph` for how the
architecture is stored.
"""

from __future__ import annotations

from netpress.export.checkpoint import (
    LoadedArtefact,
    dumps_artefact,
    load_artefact,
    model_digest,
    read_header,
    save_artefact,
)
from netpress.export.codec import register_encoding
from netpress.export.graph import trace
from netpress.export.modules import register_module_type

__all__ = [
    "LoadedArtefact",
    "dumps_artefact",
    "save_artefact",
    "load_artefact",
    "read_header",
    "model_digest",
    "trace",
    "register_encoding",
    "register_module_type",
]
