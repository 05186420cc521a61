"""Imports every built-in method module so its ``@register`` runs (an explicit list)."""

from netpress.prune import depth, posttraining, structured, unstructured
from netpress.quant import codebook, lowbit, ptq, qat
from netpress.reconstruct import quantize as reconstruct_quantize
from netpress.reconstruct import sparse as reconstruct_sparse
from netpress.recover import label_preserving, lc, methods
from netpress.split import method as split

__all__ = ["codebook", "depth", "label_preserving", "lc", "lowbit", "methods", "posttraining",
           "ptq", "qat", "reconstruct_quantize", "reconstruct_sparse", "split", "structured",
           "unstructured"]
