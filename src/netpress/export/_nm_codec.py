"""Compact storage of N:M-sparse tensors (2:4, 1:4) in the ``.npress`` artefact.

The ``nm_sparse`` encoding applies to tensors in which every 4 consecutive elements (C
order) hold at most 2 nonzero bit patterns: per group of 4 it stores which positions are
kept as one index into the ``C(4, N)`` position sets (3 bits for 2:4, 2 bits for 1:4,
packed) and the ``N`` kept elements' bit patterns (zeros included where a group has fewer
nonzeros). A 2:4 float32 tensor then takes 2.09 bytes per weight against 2.125 for the
bitmask. "Nonzero" means a nonzero bit pattern (-0.0 is kept as a value), so the round trip
is bit-exact. Registered with :func:`netpress.export.codec.register_encoding` on import of
:mod:`netpress.reconstruct`; chosen automatically when it is the cheapest.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import numpy as np
import torch

from netpress.errors import ArtefactError
from netpress.export._quant_codec import pack_bits, unpack_bits
from netpress.export.codec import Arrays, Meta, encoding_names, register_encoding

__all__ = ["ENCODING", "register"]

ENCODING = "nm_sparse"
_M = 4
_SETS = {n: np.array(list(combinations(range(_M), n)), dtype=np.int64) for n in (1, 2)}
_INDEX_BITS = {1: 2, 2: 3}


def _set_index(nonzero: np.ndarray, n: int) -> np.ndarray:
    """Per group (rows of ``nonzero``, groups × 4 bool), the index of a position set of size
    ``n`` covering its nonzeros: nonzeros first, then the lowest zero positions."""
    chosen = np.argsort(~nonzero, axis=1, kind="stable")[:, :n]
    keys = (1 << chosen).sum(1)  # the set as a bitmask of positions
    table = np.full(1 << _M, -1, dtype=np.int64)
    table[(1 << _SETS[n]).sum(1)] = np.arange(len(_SETS[n]))
    return table[keys]


def _encode(bits: np.ndarray, dtype: torch.dtype) -> tuple[Meta, Arrays] | None:
    if bits.size == 0 or bits.size % _M or bits.dtype.itemsize < 2:
        return None
    nonzero = (bits != 0).reshape(-1, _M)
    n = max(1, int(nonzero.sum(1).max()))
    if n > 2:
        return None
    index = _set_index(nonzero, n)
    positions = _SETS[n][index]  # groups × n
    groups = np.arange(positions.shape[0])[:, None]
    values = bits.reshape(-1, _M)[groups, positions].reshape(-1)
    return {"m": _M, "n": n}, {"index": pack_bits(index.astype(np.uint8), _INDEX_BITS[n]),
                               "values": values}


def _decode(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], numel: int,
            bits_dtype: np.dtype[Any]) -> np.ndarray:
    m, n = meta.get("m"), meta.get("n")
    if m != _M or n not in _SETS or numel % _M:
        raise ArtefactError(f"nm_sparse: bad metadata {dict(meta)!r:.120}")
    groups = numel // _M
    packed, values = arrays.get("index"), arrays.get("values")
    if packed is None or packed.dtype != np.uint8 or packed.ndim != 1 \
            or packed.size != -(-groups * _INDEX_BITS[n] // 8):
        raise ArtefactError("nm_sparse: the index array has the wrong size")
    if values is None or values.dtype != bits_dtype or values.shape != (groups * n,):
        raise ArtefactError("nm_sparse: the values array has the wrong size or type")
    index = unpack_bits(packed, _INDEX_BITS[n], groups).astype(np.int64)
    if index.size and int(index.max()) >= len(_SETS[n]):
        raise ArtefactError("nm_sparse: a position index is out of range")
    out = np.zeros((groups, _M), dtype=bits_dtype)
    out[np.arange(groups)[:, None], _SETS[n][index]] = values.reshape(groups, n)
    return out.reshape(-1)


def register() -> None:
    """Register the encoding (once)."""
    if ENCODING not in encoding_names():
        register_encoding(ENCODING, _encode, _decode)


register()
