"""Imports every built-in method module so its ``@register`` runs (an explicit list)."""

from netpress.prune import unstructured  # noqa: F401
from netpress.recover import methods  # noqa: F401
