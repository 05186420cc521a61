"""FLOP formulas for ATen ops PyTorch's :class:`~torch.utils.flop_counter.FlopCounterMode`
has none for, passed to it as ``custom_mapping`` (per counter, torch's registry is left alone).

* ``_grouped_mm`` (mixture-of-experts layers).
* The ``scaled_dot_product_attention`` kernels of other devices than CUDA: the CPU flash
  kernel (``_scaled_dot_product_flash_attention_for_cpu``, what ``F.scaled_dot_product_attention``
  runs on CPU whenever query, key and value share a head size and the batch is 4-D, with or
  without ``attn_mask``, ``is_causal`` or ``enable_gqa``), the MPS math kernel and the
  out-of-tree backends' ``_scaled_dot_product_fused_attention_overrideable``. They are
  counted as torch counts its CUDA kernels: the two products ``Q K^T`` and ``P V`` in full,
  per query head (grouped-query key/value heads are shared, not cheaper), causal masks
  included (half the scores are masked but computed by the math path, and torch's CUDA
  formula counts them too). Attention that falls back to the math path (3-D inputs, head
  sizes that differ, dropout in training) runs as ``bmm`` and is counted by torch already.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["EXTRA_FLOPS", "sdpa_flops"]


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``grouped_mm(a [M, K], b [G, K, N])``: each row of ``a`` meets one group's matrix
    (mixture-of-experts layers); PyTorch's counter has no formula for it."""
    return 2 * int(a_shape[0]) * int(a_shape[-1]) * int(b_shape[-1])


def sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int],
               value_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """FLOPs of attention on ``query [..., Hq, L, E]``, ``key [..., Hkv, S, E]`` and
    ``value [..., Hkv, S, Ev]``: ``Q K^T`` and ``P V`` for every query row, ``2 * rows * S *
    (E + Ev)`` with ``rows = prod(query_shape[:-1])`` (so ``Hkv`` may divide ``Hq``).

    The same as :func:`torch.utils.flop_counter.sdpa_flop_count` for 4-D shapes; the mask,
    dropout probability and scale (the remaining arguments) do not change the count.
    """
    rows = math.prod(int(n) for n in query_shape[:-1])
    keys = int(key_shape[-2])
    return 2 * rows * keys * (int(query_shape[-1]) + int(value_shape[-1]))


def _table() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    table: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_grouped_mm"):
        table[aten._grouped_mm] = _grouped_mm_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_attention_math_for_mps",
                 "_scaled_dot_product_fused_attention_overrideable"):
        if hasattr(aten, name):  # query, key, value are the first three arguments of each
            table[getattr(aten, name)] = sdpa_flops
    return table


#: ``custom_mapping`` for :class:`~torch.utils.flop_counter.FlopCounterMode`.
EXTRA_FLOPS: dict[Any, Callable[..., int]] = _table()
