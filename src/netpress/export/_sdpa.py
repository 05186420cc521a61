"""A leaner ONNX form of ``F.scaled_dot_product_attention`` for float32 attention.

``transformers`` runs most models with ``attn_implementation="sdpa"``, and the TorchScript
exporter's own symbolic for it (opset 14) turns a boolean mask into an additive one with
``Where(mask, 0, -inf)`` and then, because a row whose keys are all masked gives ``0/0`` in
``Softmax``, replaces NaNs in the attention weights with ``Where(IsNaN(w), 0, w)``: two
passes over the full ``[batch, heads, queries, keys]`` weights in every layer. On
all-MiniLM-L6-v2 at sequence length 128 those two ops took ~9% of the INT8 model's time in
ONNX Runtime (1 thread, batch 32).

Here, for float32 inputs with a boolean mask:

- the additive mask is ``Where(mask, 0, float32 min)`` at the *mask's* shape (usually
  ``[batch, 1, queries, keys]``, one head's worth): a finite bias, so no NaN can appear;
  a key the mask keeps gets exactly the weight it gets with ``-inf`` (``exp`` of the masked
  scores underflows to 0);
- a query whose keys are all masked (PyTorch gives it zeros, as the exporter's NaN guard
  does) is zeroed on the *output*: ``out * any(mask, keys)``, ``[batch, heads, queries,
  head_dim]``, a pass over a tensor ``keys / head_dim`` times smaller than the weights;
- the scale multiplies the scores once (a constant where the head size is known, which
  ONNX Runtime folds into the MatMul, as for ``attn_implementation="eager"``) instead of
  query and key by its square root.

Float masks, no mask and ``is_causal`` keep their meaning (the causal mask is torch's own
helper's). ``enable_gqa=True`` (grouped-query attention, which torch's symbolic refuses)
repeats each key/value head for its group of query heads, as ``repeat_interleave`` on the
head axis, where the head counts are fixed in the graph. Anything else (other dtypes,
dropout) goes to torch's symbolic, after the same head repeat.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(g: Any, query: Any, key: Any, value: Any,
                                 attn_mask: Any = None, dropout_p: Any = None,
                                 is_causal: Any = None, scale: Any = None,
                                 enable_gqa: Any = None) -> Any:
    """The ONNX form described in the module docs (raw exporter values in, one out)."""
    import torch
    from torch.onnx import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14 as s14

    def torchs() -> Any:  # key/value heads already repeated for grouped queries
        no_gqa = g.op("Constant", value_t=torch.tensor(False))
        return s14.scaled_dot_product_attention(g, query, key, value, attn_mask, dropout_p,
                                                is_causal, scale, no_gqa)

    causal = bool(sh._parse_arg(is_causal, "b")) if not sh._is_none(is_causal) else False
    gqa = bool(sh._parse_arg(enable_gqa, "b")) if not sh._is_none(enable_gqa) else False
    drop = float(sh._parse_arg(dropout_p, "f")) if not sh._is_none(dropout_p) else 0.0
    has_mask = not sh._is_none(attn_mask)
    mask_type = _scalar(attn_mask) if has_mask else None
    rank = sh._get_tensor_rank(key)
    groups = _groups(query, key) if gqa else 1
    if groups is None:
        from torch.onnx import errors
        raise errors.SymbolicValueError(
            "netpress exports scaled_dot_product_attention(enable_gqa=True) only where the "
            "query and key/value head counts are fixed in the graph and divide", query)
    if groups > 1:
        key, value = _repeat_heads(g, key, groups), _repeat_heads(g, value, groups)
    if (_scalar(query) != "Float" or drop != 0.0 or rank is None
            or (causal and has_mask) or mask_type not in (None, "Bool", "Float")
            or (not sh._is_none(scale) and not sh._is_constant(scale))):
        return torchs()
    if sh._is_none(scale):
        dim = sh._get_tensor_dim_size(query, -1)
        factor = (g.op("Constant", value_t=torch.tensor(1.0 / math.sqrt(dim)))
                  if dim else s14._attention_scale(g, query))
    else:
        factor = g.op("Constant", value_t=torch.tensor(float(sh._parse_arg(scale, "f"))))
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    scores = g.op("Mul", g.op("MatMul", query, g.op("Transpose", key, perm_i=perm)), factor)
    keep = None
    if causal:
        scores = g.op("Add", scores, s14._causal_attention_mask(g, query, key))
    elif mask_type == "Float":
        scores = g.op("Add", scores, attn_mask)
    elif mask_type == "Bool":
        zero = g.op("Constant", value_t=torch.tensor(0.0))
        lowest = g.op("Constant", value_t=torch.tensor(torch.finfo(torch.float32).min))
        scores = g.op("Add", scores, g.op("Where", attn_mask, zero, lowest))
        as_float = g.op("Cast", attn_mask, to_i=1)  # onnx.TensorProto.FLOAT
        keep = (g.op("ReduceMax", as_float, g.op("Constant", value_t=torch.tensor([-1])),
                     keepdims_i=1) if g.opset >= 18
                else g.op("ReduceMax", as_float, axes_i=[-1], keepdims_i=1))
    out = g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)
    return out if keep is None else g.op("Mul", out, keep)


def _groups(query: Any, key: Any) -> int | None:
    """Query heads per key/value head (axis -3), or None where either count is not fixed
    in the graph or does not divide."""
    from torch.onnx import symbolic_helper as sh

    heads, kv = sh._get_tensor_dim_size(query, -3), sh._get_tensor_dim_size(key, -3)
    if not heads or not kv or heads % kv or sh._get_tensor_rank(key) != 4:
        return None
    return heads // kv


def _repeat_heads(g: Any, x: Any, times: int) -> Any:
    """``x.repeat_interleave(times, dim=1)`` in the graph (netpress's own symbolic for it)."""
    import torch

    from netpress.export._symbolics import _repeat_interleave

    return _repeat_interleave(g, x, g.op("Constant", value_t=torch.tensor(times)),
                              g.op("Constant", value_t=torch.tensor(1)))


def _scalar(value: Any) -> str | None:
    """The exporter's scalar type name of ``value`` ("Float", "Bool", ...) or None."""
    kind = getattr(value.type(), "scalarType", None)
    return str(kind()) if callable(kind) and kind() is not None else None
