"""Imports every built-in method module so its ``@register`` runs (an explicit list)."""

from netpress.prune import unstructured
from netpress.recover import label_preserving, lc, methods

__all__ = ["label_preserving", "lc", "methods", "unstructured"]
