"""Packed low-bit storage for integer codes in the ``.npress`` artefact.

The ``packed_int`` encoding applies to int8/uint8 tensors whose values span fewer than 8
bits (4-bit weight codes in ``[-7, 7]``, 2-bit codebook indices in ``[0, 3]``, ...): each
value minus the tensor's minimum is stored in ``k = ceil(log2(max - min + 1))`` bits,
little-endian bit order, so a 4-bit layer really takes half the bytes of its int8 codes and a
2-bit one a quarter. Lossless on bit patterns like every artefact encoding; registered with
:func:`netpress.export.codec.register_encoding` on import of :mod:`netpress.quant`, and
chosen automatically when it is the cheapest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from netpress.errors import ArtefactError
from netpress.export.codec import Arrays, Meta, encoding_names, register_encoding

__all__ = ["ENCODING", "pack_bits", "unpack_bits", "register"]

ENCODING = "packed_int"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative ints below ``2**bits`` into ``ceil(n * bits / 8)`` bytes."""
    planes = np.unpackbits(values.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Invert :func:`pack_bits`: ``count`` values of ``bits`` bits each, as uint8."""
    flat = np.unpackbits(packed, bitorder="little")
    if flat[count * bits:].any():
        raise ArtefactError("packed_int: padding bits are set")
    planes = np.zeros((count, 8), dtype=np.uint8)
    planes[:, :bits] = flat[: count * bits].reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1)


def _encode(bits: np.ndarray, dtype: torch.dtype) -> tuple[Meta, Arrays] | None:
    if dtype not in (torch.int8, torch.uint8) or bits.size == 0:
        return None
    signed = dtype == torch.int8
    values = bits.view(np.int8).astype(np.int16) if signed else bits.astype(np.int16)
    lo, hi = int(values.min()), int(values.max())
    width = max(1, (hi - lo).bit_length())
    if width >= 8:
        return None
    packed = pack_bits((values - lo).astype(np.uint8), width)
    return {"bits": width, "offset": lo, "signed": signed}, {"packed": packed}


def _decode(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], numel: int,
            bits_dtype: np.dtype[Any]) -> np.ndarray:
    width, offset, signed = meta.get("bits"), meta.get("offset"), meta.get("signed")
    if not isinstance(width, int) or not 1 <= width <= 7 or not isinstance(offset, int) \
            or not isinstance(signed, bool) or bits_dtype != np.uint8:
        raise ArtefactError(f"packed_int: bad metadata {dict(meta)!r:.120}")
    packed = arrays.get("packed")
    if packed is None or packed.dtype != np.uint8 or packed.ndim != 1 \
            or packed.size != -(-numel * width // 8):
        raise ArtefactError("packed_int: the packed array has the wrong size")
    values = unpack_bits(packed, width, numel).astype(np.int16) + offset
    lo, hi = (-128, 127) if signed else (0, 255)
    if values.size and (int(values.min()) < lo or int(values.max()) > hi):
        raise ArtefactError("packed_int: offset puts values out of range")
    return values.astype(np.int8).view(np.uint8) if signed else values.astype(np.uint8)


def register() -> None:
    """Register the encoding (once)."""
    if ENCODING not in encoding_names():
        register_encoding(ENCODING, _encode, _decode)


register()
