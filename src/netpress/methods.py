"""Imports every built-in method module so its ``@register`` runs (an explicit list)."""

from netpress.prune import structured, unstructured
from netpress.quant import codebook, lowbit, ptq, qat
from netpress.reconstruct import quantize as reconstruct_quantize
from netpress.reconstruct import sparse as reconstruct_sparse
from netpress.recover import label_preserving, lc, methods

__all__ = ["codebook", "label_preserving", "lc", "lowbit", "methods", "ptq", "qat",
           "structured", "unstructured", "reconstruct_quantize", "reconstruct_sparse"]
