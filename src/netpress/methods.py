"""Imports every built-in method module so its ``@register`` runs (an explicit list)."""

from netpress.prune import structured, unstructured
from netpress.quant import codebook, lowbit, ptq, qat
from netpress.recover import label_preserving, lc, methods
from netpress.split import method as split

__all__ = ["codebook", "label_preserving", "lc", "lowbit", "methods", "ptq", "qat",
           "split", "structured", "unstructured"]
