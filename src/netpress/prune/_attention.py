"""``nn.MultiheadAttention`` as separate q/k/v/out projections, so heads can be removed.

``nn.MultiheadAttention`` ties its inner width (``num_heads * head_dim``) to ``embed_dim``,
the width of its input and output, so no head can leave it while the model width stays.
:func:`split_attention` replaces each one by :class:`HeadAttention`, which computes the same
function (up to float rounding) with four ``nn.Linear`` layers and
``F.scaled_dot_product_attention``; its heads are then ordinary units for the channel graph.
Supported: ``bias`` on or off, ``kdim``/``vdim``, ``batch_first`` either way, 2-D or
broadcastable boolean/float ``attn_mask``, ``key_padding_mask``, ``is_causal``. Modules with
``add_bias_kv`` or ``add_zero_attn``, and modules the example forward calls with unbatched
inputs, are left as they are (their heads stay whole).
With ``need_weights=True`` the head-averaged weights are returned too; the average makes the
heads a fixed dimension, so only models calling it with ``need_weights=False`` (as
``nn.TransformerEncoderLayer`` does) have removable heads. ``nn.TransformerEncoder``'s
nested-tensor fast path is switched off where its layers were split (it reads the packed
weights).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import Inputs, call_model
from netpress.export.modules import register_module_type
from netpress.measure.collect import evaluating

__all__ = ["HeadAttention", "split_attention", "head_attention_spec"]


class HeadAttention(nn.Module):
    """Multi-head attention with separate projections and a head count that may shrink."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, out_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.head_dim = embed_dim, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=bias)

    @property
    def num_heads(self) -> int:
        """Heads left (pruning removes whole heads: ``head_dim`` rows of each projection)."""
        return self.q_proj.out_features // self.head_dim

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        return x.view(b, n, -1, self.head_dim).transpose(1, 2)

    # nn.TransformerEncoderLayer reads these to decide on its fused fast path; with them it
    # never takes it (the fast path would need nn.MultiheadAttention's packed weights)
    in_proj_bias = None
    in_proj_weight = None
    _qkv_same_embed_dim = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward``, for batched
        inputs (no control flow on tensors, so ``torch.fx`` traces it)."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                             is_causal=is_causal and mask is None)
        y = self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * (self.head_dim ** -0.5)
            weights = (scores if mask is None else scores + mask).softmax(-1)
            if average_attn_weights:
                weights = weights.mean(1)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return y, weights


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """One additive float mask from MHA's boolean (True = masked) or float masks."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None if attn_mask is None else additive(attn_mask)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _convert(m: nn.MultiheadAttention) -> HeadAttention | None:
    if m.bias_k is not None or m.add_zero_attn:
        return None
    e, h = m.embed_dim, m.num_heads
    bias = m.in_proj_bias is not None
    new = HeadAttention(e, h, e // h, kdim=m.kdim, vdim=m.vdim, bias=bias,
                        dropout=m.dropout, batch_first=m.batch_first)
    with torch.no_grad():
        if m._qkv_same_embed_dim:
            ws = m.in_proj_weight.chunk(3)
        else:
            ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        bs: Any = m.in_proj_bias.chunk(3) if bias else (None, None, None)
        for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        new.out_proj.weight.copy_(m.out_proj.weight)
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
    ref = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    return new.to(device=ref.device, dtype=ref.dtype).train(m.training)


def split_attention(model: nn.Module, example_inputs: Inputs) -> list[str]:
    """Replace every supported ``nn.MultiheadAttention`` in ``model`` (in place) that the
    example forward calls with batched inputs only; returns the paths replaced."""
    calls: dict[str, list[int]] = {}
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and path:
            def hook(mod: nn.Module, args: Any, kwargs: Any, path: str = path) -> None:
                query = args[0] if args else kwargs.get("query")
                calls.setdefault(path, []).append(query.dim())

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    if not handles:
        return []
    try:
        with torch.no_grad(), evaluating(model):
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    done = []
    for path, m in list(model.named_modules()):
        if not isinstance(m, nn.MultiheadAttention) or set(calls.get(path, [2])) != {3}:
            continue
        new = _convert(m)
        if new is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
        done.append(path)
    if done:  # the nested-tensor fast path of nn.TransformerEncoder needs packed weights
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
    return done


def head_attention_spec(m: nn.Module) -> dict[str, Any]:
    """Constructor kwargs of a :class:`HeadAttention` (for the artefact's module registry:
    ``register_module_type(HeadAttention, head_attention_spec, HeadAttention)``)."""
    assert isinstance(m, HeadAttention)
    return {"embed_dim": m.q_proj.in_features, "num_heads": m.num_heads,
            "head_dim": m.head_dim, "kdim": m.k_proj.in_features, "vdim": m.v_proj.in_features,
            "out_dim": m.out_proj.out_features, "bias": m.q_proj.bias is not None,
            "dropout": m.dropout, "batch_first": m.batch_first}


# artefacts rebuild HeadAttention from its spec like any torch.nn layer
register_module_type(HeadAttention, head_attention_spec, HeadAttention,
                     name="netpress.HeadAttention")
