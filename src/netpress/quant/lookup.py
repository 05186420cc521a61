"""Which embedding tables a quantized table can stand in for: the plain lookup, or a
subclass that multiplies it by a constant (``transformers``' scaled word embeddings, e.g.
Gemma's ``sqrt(hidden)``), checked numerically rather than by class name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["lookup_scale", "scaled_lookup"]


@torch.no_grad()
def lookup_scale(embedding: nn.Embedding) -> float:
    """The constant ``c`` with ``embedding(ids) == c · F.embedding(ids, weight)``: 1 for an
    ``nn.Embedding``; for a subclass (``transformers``' scaled word embeddings) its
    ``embed_scale``, checked on a few rows. ValueError when the subclass computes anything
    else."""
    if type(embedding) is nn.Embedding:
        return 1.0
    scale = getattr(embedding, "embed_scale", 1.0)
    c = float(scale) if isinstance(scale, (int, float, torch.Tensor)) else float("nan")
    ids = torch.arange(min(8, embedding.num_embeddings), device=embedding.weight.device)
    plain = F.embedding(ids, embedding.weight)
    try:  # positional-embedding subclasses take other arguments, or read ids otherwise
        out = embedding(ids)
    except Exception:  # whatever their own forward raises on plain token ids
        out = None
    if not isinstance(out, torch.Tensor) or out.shape != plain.shape or \
            not torch.equal(out, plain * c):
        raise ValueError(f"{type(embedding).__name__} computes more than a scaled lookup")
    return c


def scaled_lookup(embedding: nn.Module) -> bool:
    """Whether ``embedding`` is an ``nn.Embedding`` whose output :func:`lookup_scale` can
    express (no ``max_norm`` renormalisation)."""
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
        return False
    try:
        lookup_scale(embedding)
    except ValueError:
        return False
    return True
