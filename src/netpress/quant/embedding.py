"""Embedding tables of int8 rows (``DynamicQuantize``'s tables): a gather of int8 rows times
their per-row scale, exported as ``Gather(int8) → Cast → Mul(Gather(scales))``.

A table tied to the model's quantized output layer (:meth:`QuantEmbedding.tied_to`) reads
that layer's codes and scales instead of holding its own (times the layer's outlier
``in_scale`` per column when it is smoothed): one int8 copy, as the float model had one
weight. A ``transformers`` scaled word embedding keeps its constant factor
(:func:`netpress.quant.lookup.lookup_scale`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netpress.errors import ModelError
from netpress.export.modules import register_module_type
from netpress.quant.lookup import lookup_scale

if TYPE_CHECKING:
    from netpress.quant.dynamic import DynamicQuantLinear

__all__ = ["QuantEmbedding", "int8_row_codes"]


def int8_row_codes(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 ``(codes, scale)`` of an embedding table, one scale per row."""
    t = table.detach().float()
    scale = t.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class QuantEmbedding(nn.Module):
    """An embedding table of int8 rows, each with its scale: ``table_q[ids] · scale[ids]``
    (times ``in_scale`` per column when ``smoothed``: the codes of a tied, smoothed
    :class:`DynamicQuantLinear`, see :meth:`tied_to`)."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    in_scale: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None, smoothed: bool = False,
                 embed_scale: float = 1.0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.smoothed = padding_idx, smoothed
        self.scale_by = float(embed_scale)  # a scaled word embedding's constant factor
        self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim,
                                                     dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self.register_buffer("in_scale", torch.ones(embedding_dim if smoothed else 0))

    @classmethod
    def tied_to(cls, layer: DynamicQuantLinear, emb: nn.Embedding) -> QuantEmbedding:
        """The table of ``emb`` (tied to ``layer``'s weight before quantization) read from
        ``layer``'s codes and scales: the same tensor objects, not copies."""
        if (emb.num_embeddings, emb.embedding_dim) != (layer.out_features, layer.in_features):
            raise ModelError(f"DynamicQuantize: a {emb.num_embeddings}x{emb.embedding_dim} "
                             f"table cannot read the codes of a {layer.out_features}x"
                             f"{layer.in_features} Linear")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, layer.smoothed,
                lookup_scale(emb))
        q.weight_q, q.weight_scale = layer.weight_q, layer.weight_scale
        if layer.smoothed:
            q.in_scale = layer.in_scale
        return q

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> QuantEmbedding:
        if emb.max_norm is not None:
            raise ModelError("DynamicQuantize: an nn.Embedding with max_norm renormalises its "
                             "rows at run time and cannot be quantized; add it to ignore")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx,
                embed_scale=lookup_scale(emb))
        codes, scale = int8_row_codes(emb.weight)
        with torch.no_grad():
            q.weight_q.copy_(codes)
            q.weight_scale.copy_(scale)
        return q.to(emb.weight.device)

    bits = 8  #: the width of the row codes (read by netpress.measure.size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float table the codes stand for: codes times row scales (times ``in_scale``
        per column when smoothed)."""
        t = self.weight_q.float() * self.weight_scale.float()[:, None]
        return t * self.in_scale.float()[None, :] if self.smoothed else t

    @property
    def weight(self) -> torch.Tensor:
        """:meth:`dequantized_weight`, read-only: model code that reads ``embedding.weight``
        (ProphetNet's n-gram stream, Llama 4) keeps working. The forward pass does not use
        it."""
        return self.dequantized_weight()

    @property
    def embed_scale(self) -> torch.Tensor:
        """The constant factor as a float32 scalar tensor, as ``transformers``' scaled word
        embeddings hold it (model code may read ``embed_tokens.embed_scale``)."""
        return torch.tensor(self.scale_by, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.weight_q[ids]
        rows = codes.float() * self.weight_scale[ids].unsqueeze(-1)
        rows = rows * self.in_scale if self.smoothed else rows
        return rows * self.scale_by if self.scale_by != 1.0 else rows


def _embedding_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, QuantEmbedding)
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx, "smoothed": m.smoothed, "embed_scale": m.scale_by}


register_module_type(QuantEmbedding, _embedding_spec, QuantEmbedding,
                     name="netpress.QuantEmbedding")
