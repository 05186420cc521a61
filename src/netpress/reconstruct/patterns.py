"""Sparsity patterns as pure functions: N:M masks, per-block and per-row prune counts.

``"N:M"`` keeps (at most) ``N`` weights of every ``M`` consecutive weights of a row
(NVIDIA's 2:4 keeps 2 of 4); ``"unstructured"`` puts no constraint on where zeros go.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from netpress.prune.masks import smallest_mask

__all__ = ["parse_pattern", "nm_keep_mask", "holds_nm", "split_count", "row_mask",
           "PackedMask", "pack_mask", "unpack_mask"]


class PackedMask(NamedTuple):
    """A bool mask stored 8 entries to a byte, first entry in the highest bit."""

    bits: torch.Tensor
    shape: tuple[int, ...]


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> PackedMask:
    """``mask`` (bool, any shape) as bits: a keep-mask held while a pass goes on costs an
    eighth of its bool size (BERT-base's Linear layers: 10 MB instead of 81 MB)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = (flat.reshape(-1, 8) * _bit_values(flat.device)).sum(1, dtype=torch.uint8)
    return PackedMask(bits, tuple(mask.shape))


def unpack_mask(packed: PackedMask) -> torch.Tensor:
    """The bool mask :func:`pack_mask` packed, bit for bit."""
    bits, shape = packed
    n = 1
    for s in shape:
        n *= s
    values = _bit_values(bits.device)
    flat = (bits[:, None] & values).ne(0).reshape(-1)
    return flat[:n].reshape(shape).clone()


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4); ValueError for anything else."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m <= 32:
            return n, m
    raise ValueError(f"pattern={pattern!r}: use 'unstructured' or 'N:M' with 0 < N < M <= 32 "
                     "(e.g. '2:4')")


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the last dim
    (ties: the lower index is kept). The last dim must be a multiple of ``m``."""
    if scores.shape[-1] % m:
        raise ValueError(f"the last dim ({scores.shape[-1]}) is not a multiple of M={m}")
    groups = scores.reshape(-1, m).float()
    # a stable sort on the negated scores keeps the lower index first among ties
    order = torch.sort(-groups, dim=1, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)


def holds_nm(values: torch.Tensor, n: int, m: int) -> bool:
    """True if every ``m`` consecutive entries along the last dim hold at most ``n`` nonzeros."""
    if values.shape[-1] % m:
        return False
    return bool(((values.reshape(-1, m) != 0).sum(1) <= n).all())


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over parts of ``sizes`` in proportion (largest remainder; exact sum)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    shares = [total * s / whole for s in sizes]
    counts = [min(s, int(x)) for s, x in zip(sizes, shares)]
    order = sorted(range(len(sizes)), key=lambda i: (counts[i] - shares[i], i))
    left = total - sum(counts)
    for i in order:
        if left <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            left -= 1
    return counts


def row_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that prunes ``count`` of a 2-D score matrix's entries, spread evenly over its
    rows (each row drops its smallest; rows get ``count // rows`` or one more, first rows
    first), as Wanda compares weights within each output row."""
    rows, cols = scores.shape
    per_row = split_count(count, [cols] * rows)
    return torch.stack([smallest_mask(scores[r], k) for r, k in enumerate(per_row)])
