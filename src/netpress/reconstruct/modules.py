"""Layers with group-wise quantized weights (what ``GPTQ`` leaves in the model).

The weight is stored as integer codes ``weight_q`` (out × d, int8 for symmetric grids,
uint8 otherwise), float16 scales ``weight_scale`` (out × groups) and, for asymmetric grids,
uint8 zero points ``weight_zero``; column ``c`` belongs to group ``c // group_size`` (the
last group may be shorter). The forward pass dequantizes ``(q - zero) · scale`` in float32
and runs the float op. The artefact stores the codes packed (``packed_int``: 4-bit codes
take half a byte). All three types register with :func:`register_module_type`.

:class:`GroupQuantEmbedding` is the input embedding table of a language model whose output
layer is tied to it: when ``GPTQ`` quantizes that output layer, the table reads the *same*
code, scale and zero-point tensors (one stored copy, as the float model had one tied weight),
gathering the rows of the ids it is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress.export.modules import register_module_type
from netpress.quant.lookup import lookup_scale
from netpress.quant.primitives import code_dtype, qrange

__all__ = ["GroupQuantWeight", "GroupQuantLinear", "GroupQuantConv", "GroupQuantEmbedding"]


class GroupQuantWeight(nn.Module):
    """The shared storage and dequantization of the group-wise quantized layers."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor | None
    bias: torch.Tensor | None

    def _init_weight(self, out: int, d: int, bits: int, group_size: int, symmetric: bool,
                     bias: bool) -> None:
        qmin, _ = qrange(bits, symmetric=symmetric)
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = -(-d // group_size)
        self.register_buffer("weight_q", torch.zeros(out, d, dtype=code_dtype(qmin)))
        self.register_buffer("weight_scale", torch.ones(out, groups, dtype=torch.float16))
        self.register_buffer("weight_zero", None if symmetric
                             else torch.zeros(out, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None) -> None:
        """Store codes (out × d), scales and zero points (out × groups)."""
        self.weight_q.copy_(codes.reshape(self.weight_q.shape))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        if self.weight_zero is not None:
            if zero is None:
                raise ValueError("an asymmetric grid needs zero points")
            self.weight_zero.copy_(zero.reshape(self.weight_zero.shape))

    def dequantized_weight(self) -> torch.Tensor:
        """``(q - zero) · scale`` as float32, out × d."""
        idx = torch.arange(self.weight_q.shape[1], device=self.weight_q.device) \
            // self.group_size
        q = self.weight_q.float()
        if self.weight_zero is not None:
            q = q - self.weight_zero.float()[:, idx]
        return q * self.weight_scale.float()[:, idx]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the float layer's own shape (out × in, or the conv's
        out × in/groups × kernel), read-only: model code that reads ``layer.weight`` (its
        dtype or device, e.g. ``transformers``' ViT patch embedding) keeps working."""
        return self.dequantized_weight().reshape(self._weight_shape())

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_q.shape)

    def _spec(self) -> dict[str, Any]:
        return {"bias": self.bias is not None, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}


class GroupQuantLinear(GroupQuantWeight):
    """A Linear whose weight is group-wise quantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight(out_features, in_features, bits, group_size, symmetric, bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._spec()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


class GroupQuantConv(GroupQuantWeight):
    """A Conv1d or Conv2d (by the length of ``kernel_size``) with group-wise quantized
    weights; the codes hold the weight flattened to out × (in/groups · kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...], padding: tuple[int, ...] | str,
                 dilation: tuple[int, ...], groups: int = 1, padding_mode: str = "zeros",
                 bias: bool = True, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False) -> None:
        super().__init__()
        if len(kernel_size) not in (1, 2):
            raise ValueError(f"kernel_size={kernel_size}: only Conv1d and Conv2d")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.padding_mode = padding, tuple(dilation), padding_mode
        d = in_channels // groups
        for k in self.kernel_size:
            d *= k
        self._init_weight(out_channels, d, bits, group_size, symmetric, bias)
        self._pad = _pad_args(self.kernel_size, self.dilation, padding)

    @classmethod
    def like(cls, conv: nn.Conv1d | nn.Conv2d, bits: int, group_size: int,
             symmetric: bool) -> GroupQuantConv:
        """An empty quantized counterpart of ``conv`` (same geometry, on its device)."""
        q = cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                tuple(conv.stride), conv.padding if isinstance(conv.padding, str)
                else tuple(conv.padding), tuple(conv.dilation), conv.groups,
                conv.padding_mode, conv.bias is not None, bits, group_size, symmetric)
        return q.to(conv.weight.device)

    def spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "padding_mode": self.padding_mode, **self._spec()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupQuantEmbedding(GroupQuantWeight):
    """An embedding table whose rows are group-wise quantized codes: row ``i`` is
    ``(q[i] - zero[i]) · scale[i]`` per column group, times ``embed_scale`` (the constant
    factor of ``transformers``' scaled word embeddings, e.g. Gemma's ``sqrt(hidden)``). Built
    by :meth:`tied_to` it shares its tensors with a tied output layer (see the module docs)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False,
                 padding_idx: int | None = None, embed_scale: float = 1.0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.scale_by = padding_idx, float(embed_scale)
        self._init_weight(num_embeddings, embedding_dim, bits, group_size, symmetric, False)

    @classmethod
    def tied_to(cls, layer: GroupQuantLinear, embedding: nn.Embedding) -> GroupQuantEmbedding:
        """The table of ``embedding`` (tied to ``layer``'s weight before quantization) read
        from ``layer``'s codes: the same tensor objects, not copies. ``embedding`` may be a
        subclass whose output is the plain lookup times a constant (checked on its rows);
        ValueError for any other."""
        if (embedding.num_embeddings, embedding.embedding_dim) != \
                (layer.out_features, layer.in_features):
            raise ValueError(f"embedding {embedding.num_embeddings}x{embedding.embedding_dim} "
                             f"is not the shape of the layer's weight "
                             f"{layer.out_features}x{layer.in_features}")
        if embedding.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its rows at run time")
        table = cls(embedding.num_embeddings, embedding.embedding_dim, layer.bits,
                    layer.group_size, layer.symmetric, embedding.padding_idx,
                    lookup_scale(embedding))
        table.weight_q, table.weight_scale = layer.weight_q, layer.weight_scale
        table.weight_zero = layer.weight_zero
        return table

    def spec(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "padding_idx": self.padding_idx,
                "embed_scale": self.scale_by}

    @property
    def embed_scale(self) -> torch.Tensor:
        """The constant factor as a float32 scalar tensor, as ``transformers``' scaled word
        embeddings hold it (model code may read ``embed_tokens.embed_scale``)."""
        return torch.tensor(self.scale_by, dtype=torch.float32)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(self.embedding_dim, device=self.weight_q.device) // self.group_size
        q = self.weight_q[ids].float()
        if self.weight_zero is not None:
            q = q - self.weight_zero[ids].float()[..., idx]
        rows = q * self.weight_scale[ids].float()[..., idx]
        return rows * self.scale_by if self.scale_by != 1.0 else rows


def _pad_args(kernel: tuple[int, ...], dilation: tuple[int, ...],
              padding: tuple[int, ...] | str) -> tuple[int, ...]:
    """``F.pad`` arguments (last dim first) of a conv's padding, as torch's convs compute
    them for non-zeros padding modes."""
    out: list[int] = []
    for i in reversed(range(len(kernel))):
        if padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            out += [total // 2, total - total // 2]
        elif padding == "valid":
            out += [0, 0]
        else:
            assert not isinstance(padding, str)
            out += [padding[i], padding[i]]
    return tuple(out)


def _spec_of(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, (GroupQuantLinear, GroupQuantConv, GroupQuantEmbedding))
    return m.spec()


register_module_type(GroupQuantLinear, _spec_of, GroupQuantLinear,
                     name="netpress.GroupQuantLinear")
register_module_type(GroupQuantConv, _spec_of, GroupQuantConv, name="netpress.GroupQuantConv")
register_module_type(GroupQuantEmbedding, _spec_of, GroupQuantEmbedding,
                     name="netpress.GroupQuantEmbedding")
