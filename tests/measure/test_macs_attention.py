"""MACs count ``scaled_dot_product_attention`` on CPU as PyTorch's counter does on CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry

from netpress.measure._flops import sdpa_flops
from netpress.measure.macs import count_macs, count_sparse_macs, layer_macs, macs_breakdown

B, HQ, HKV, L, S, E = 2, 4, 2, 5, 7, 8
#: Q K^T and P V for every query head: 2 * B*HQ*L*S*E multiply-accumulates.
ATTENTION_MACS = 2 * B * HQ * L * S * E


class Attention(nn.Module):
    """``F.scaled_dot_product_attention`` with fixed keyword arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


def _qkv(kv_heads: int = HQ, value_dim: int = E) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(B, HQ, L, E, generator=gen),
            torch.randn(B, kv_heads, S, E, generator=gen),
            torch.randn(B, kv_heads, S, value_dim, generator=gen))


@pytest.mark.parametrize("kwargs", [
    {}, {"is_causal": True}, {"attn_mask": torch.randn(L, S)},
    {"attn_mask": torch.rand(B, 1, L, S) > 0.3}, {"scale": 0.5},
], ids=["plain", "causal", "float_mask", "bool_mask", "scale"])
def test_cpu_sdpa_counts_both_products(kwargs: dict[str, Any]) -> None:
    """Every CPU kernel path (fused flash kernel, or the math fallback for mismatched head
    sizes) counts Q K^T and P V in full, whatever the mask (causal masks included, as
    torch's CUDA formula counts them)."""
    assert count_macs(Attention(**kwargs), _qkv()) == ATTENTION_MACS
    # value head size 6 != 8 sends the CPU dispatcher to the math path (bmm)
    assert count_macs(Attention(**kwargs), _qkv(value_dim=6)) == B * HQ * L * S * (E + 6)


def test_grouped_query_sdpa_counts_every_query_head() -> None:
    q, k, v = _qkv(kv_heads=HKV)
    assert count_macs(Attention(enable_gqa=True), (q, k, v)) == ATTENTION_MACS
    expanded = (q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1))
    assert count_macs(Attention(), expanded) == ATTENTION_MACS
    mask = torch.randn(L, S)
    assert count_macs(Attention(enable_gqa=True, attn_mask=mask), (q, k, v)) == ATTENTION_MACS


def test_three_dimensional_sdpa_counts_too() -> None:
    q, k, v = (t[0] for t in _qkv())  # [heads, len, dim]: the math path on CPU
    assert count_macs(Attention(), (q, k, v)) == ATTENTION_MACS // B


@pytest.mark.parametrize("shapes", [
    ((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8)),
    ((3, 8, 16, 32), (3, 2, 16, 32), (3, 2, 16, 32)),  # grouped-query
    ((1, 6, 9, 16), (1, 3, 11, 16), (1, 3, 11, 24)),  # grouped-query, larger value heads
])
def test_formula_matches_torch_cuda_formula(shapes: tuple[tuple[int, ...], ...]) -> None:
    """The formula given to the CPU kernel is the one torch registers for its CUDA kernels."""
    sizes = [torch.Size(s) for s in shapes]
    for op in (torch.ops.aten._scaled_dot_product_flash_attention,
               torch.ops.aten._scaled_dot_product_efficient_attention):
        assert sdpa_flops(*sizes) == flop_registry[op](*sizes)


def _mha_macs(tokens: int, width: int, heads: int) -> int:
    projections = tokens * 4 * width * width  # q, k, v and out
    return projections + 2 * heads * tokens * tokens * (width // heads)


def test_multihead_attention_fast_path_is_counted() -> None:
    """``nn.MultiheadAttention(batch_first=True)`` in eval mode under ``no_grad`` takes
    PyTorch's fused fast path, one op without a FLOP formula: counted 0 before."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        seq = x if batch_first else x.transpose(0, 1)
        assert count_macs(mha, (seq, seq, seq)) == _mha_macs(6, 16, 4)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_transformer_encoder_fast_path_is_counted() -> None:
    """``nn.TransformerEncoder`` (fused fast path and nested tensors in eval mode): the
    attention, its projections and the feed-forward layers, each attributed to its layer."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[False] * 4 + [True] * 2])  # padding: the nested-tensor path
    per_layer = _mha_macs(6, 16, 4) + 2 * 6 * 16 * 32
    assert count_macs(model, x) == 2 * per_layer
    assert count_macs(model, (x, None, mask)) == 2 * per_layer
    assert layer_macs(model, x) == {f"layers.{i}.linear{j}": 6 * 16 * 32
                                    for i in range(2) for j in (1, 2)}
    with torch.no_grad():  # counting does not change what the model computes
        out = model(x)
        count_macs(model, x)
        torch.testing.assert_close(model(x), out)


def test_sparse_count_keeps_attention_dense() -> None:
    """``count_sparse_macs`` scales the Linear layers by their density; attention stays."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(1, 6, 16)
    breakdown = macs_breakdown(mha, (x, x, x))
    assert breakdown["dense"] == breakdown["nonzero"] == _mha_macs(6, 16, 4)
    assert count_sparse_macs(mha, (x, x, x)) == _mha_macs(6, 16, 4)
