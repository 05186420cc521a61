"""A static arithmetic coder for the bottleneck's codes, with a per-channel frequency model.

zstd (the coder the rest of netpress uses) spends 15–25 bytes of headers and Huffman tables
on an input of a few hundred small codes, a fifth of what a 10×-smaller-than-JPEG bottleneck
may send. Here both ends hold a :class:`CodeModel` instead (fitted once on the codes of
training inputs, shipped like a zstd dictionary): for each channel ``c`` a frequency table
``f_c(q)`` over the ``2^bits`` codes (Laplace-smoothed counts scaled to a total of
``2^15``). Each input's codes are then sent as one arithmetic-coded bit string (32-bit
integer coder of Witten, Neal and Cleary, 1987): its length is within two bits of
``sum -log2(f_c(q) / total)``, padded to whole bytes. Pure Python: about a microsecond per
code value.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netpress.errors import DataError

__all__ = ["CodeModel", "fit_code_model", "encode_codes", "decode_codes", "arith_bytes",
           "save_code_model", "load_code_model", "encode_stream", "decode_stream"]

_TOP = (1 << 32) - 1
_HALF = 1 << 31
_QUARTER = 1 << 30
_TOTAL_BITS = 15


@dataclass(frozen=True)
class CodeModel:
    """Cumulative frequencies ``cum[c]`` (length ``2^bits + 1``, ``cum[c][-1] == total``)
    of each channel's codes."""

    bits: int
    cum: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        """Bytes to ship the model: one frequency per channel and code (2 bytes for the
        fitted models' 15-bit totals, more for finer ones)."""
        per = max(2, (max(row[-1] for row in self.cum).bit_length() + 7) // 8)
        return per * len(self.cum) * (len(self.cum[0]) - 1)

    def ideal_bits(self, codes: np.ndarray) -> float:
        """``sum -log2 p(q)`` of one input's codes under the model (the coder's target)."""
        flat = _by_channel(codes, len(self.cum))
        total = 0.0
        for c, row in enumerate(flat):
            cum = np.asarray(self.cum[c], dtype=np.float64)
            freq = (cum[1:] - cum[:-1])[row.astype(np.int64)]
            total -= float(np.log2(freq / cum[-1]).sum())
        return total


def _by_channel(codes: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim == 0 or arr.shape[0] != channels:
        raise DataError(f"arithmetic coder: codes of shape {arr.shape} do not have the model's "
                        f"{channels} channels first; fit the model on codes of this split")
    return arr.reshape(channels, -1)


def fit_code_model(codes: list[np.ndarray], bits: int) -> CodeModel:
    """Per-channel frequency tables of ``codes`` (arrays of shape ``(C, ...)``), smoothed so
    every code has a frequency of at least 1."""
    if not codes:
        raise DataError("arithmetic coder: no codes to fit the model on")
    symbols = 2 ** bits
    channels = np.asarray(codes[0]).shape[0]
    counts = np.ones((channels, symbols), dtype=np.float64)
    for arr in codes:
        flat = _by_channel(arr, channels).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= symbols):
            raise DataError(f"arithmetic coder: codes outside [0, {symbols - 1}] for "
                            f"{bits}-bit codes")
        for c in range(channels):
            counts[c] += np.bincount(flat[c], minlength=symbols)
    target = 2 ** _TOTAL_BITS
    cums = []
    for row in counts:
        freq = np.maximum(1, np.floor(row / row.sum() * (target - symbols))).astype(np.int64)
        cums.append(tuple(int(v) for v in np.concatenate([[0], np.cumsum(freq)])))
    return CodeModel(bits=bits, cum=tuple(cums))


def _symbols(codes: np.ndarray, model: CodeModel) -> tuple[list[int], list[int]]:
    flat = _by_channel(codes, len(model.cum)).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= len(model.cum[0]) - 1):
        raise DataError(f"arithmetic coder: codes outside the model's {model.bits}-bit range")
    chans = np.repeat(np.arange(flat.shape[0]), flat.shape[1])
    return flat.reshape(-1).tolist(), chans.tolist()


def encode_codes(codes: np.ndarray, model: CodeModel) -> bytes:
    """The arithmetic-coded bytes of one input's codes (shape ``(C, ...)``)."""
    symbols, chans = _symbols(codes, model)
    return encode_stream(symbols, [model.cum[c] for c in chans])


def encode_stream(symbols: Sequence[int], cums: Sequence[Sequence[int]]) -> bytes:
    """Arithmetic-code ``symbols``, symbol ``k`` with the cumulative frequencies ``cums[k]``
    (``cums[k][s]`` below ``s``, ``cums[k][-1]`` the total): the coder core that every model
    of this package (per-channel, context) feeds."""
    low, high, pending = 0, _TOP, 0
    out: list[int] = []

    def emit(bit: int) -> None:
        nonlocal pending
        out.append(bit)
        out.extend([1 - bit] * pending)
        pending = 0

    for s, cum in zip(symbols, cums, strict=True):
        span = high - low + 1
        high = low + span * cum[s + 1] // cum[-1] - 1
        low = low + span * cum[s] // cum[-1]
        while True:
            if high < _HALF:
                emit(0)
            elif low >= _HALF:
                emit(1)
                low, high = low - _HALF, high - _HALF
            elif low >= _QUARTER and high < 3 * _QUARTER:
                pending += 1
                low, high = low - _QUARTER, high - _QUARTER
            else:
                break
            low, high = 2 * low, 2 * high + 1
    pending += 1
    emit(0 if low < _QUARTER else 1)
    return np.packbits(np.array(out, dtype=np.uint8)).tobytes()


def decode_codes(data: bytes, model: CodeModel, shape: tuple[int, ...]) -> np.ndarray:
    """Invert :func:`encode_codes` for codes of ``shape`` (the device part's code shape)."""
    n = int(np.prod(shape))
    per_channel = n // shape[0]
    out = decode_stream(data, n, lambda i, _decoded: model.cum[i // per_channel])
    return np.asarray(out, dtype=np.uint8).reshape(shape)


def decode_stream(data: bytes, n: int,
                  cum_at: Callable[[int, list[int]], Sequence[int]]) -> list[int]:
    """Invert :func:`encode_stream` for ``n`` symbols: ``cum_at(k, decoded)`` gives symbol
    ``k``'s cumulative frequencies from the ``k`` symbols decoded before it (a context model
    looks at them; the encoder must have used the same tables)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    pos = 0

    def next_bit() -> int:
        nonlocal pos
        pos += 1
        return bits[pos - 1] if pos <= len(bits) else 0

    value = 0
    for _ in range(32):
        value = 2 * value + next_bit()
    low, high = 0, _TOP
    out: list[int] = []
    for i in range(n):
        cum = cum_at(i, out)
        span = high - low + 1
        target = ((value - low + 1) * cum[-1] - 1) // span
        s = bisect.bisect_right(cum, target) - 1
        out.append(s)
        high = low + span * cum[s + 1] // cum[-1] - 1
        low = low + span * cum[s] // cum[-1]
        while True:
            if high < _HALF:
                pass
            elif low >= _HALF:
                value, low, high = value - _HALF, low - _HALF, high - _HALF
            elif low >= _QUARTER and high < 3 * _QUARTER:
                value, low, high = value - _QUARTER, low - _QUARTER, high - _QUARTER
            else:
                break
            low, high, value = 2 * low, 2 * high + 1, 2 * value + next_bit()
    return out


def arith_bytes(codes: list[np.ndarray], model: CodeModel) -> np.ndarray:
    """Bytes of each input's arithmetic-coded codes."""
    return np.array([len(encode_codes(c, model)) for c in codes], dtype=np.int64)


def save_code_model(model: CodeModel, path: str | Path) -> Path:
    """Write ``model`` as JSON (``bits`` and the cumulative frequencies), atomically."""
    from netpress._atomic import atomic_write

    atomic_write(path, json.dumps({"bits": model.bits, "cum": [list(r) for r in model.cum]}))
    return Path(path)


def load_code_model(path: str | Path) -> CodeModel:
    """Read a model written by :func:`save_code_model`, checking its tables."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        bits, cum = int(raw["bits"]), tuple(tuple(int(v) for v in r) for r in raw["cum"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"arithmetic coder: '{path}' is not a code model written by "
                        f"save_code_model ({exc})") from exc
    if not cum or any(len(r) != 2 ** bits + 1 or r[0] != 0
                      or any(b <= a for a, b in zip(r, r[1:])) for r in cum):
        raise DataError(f"arithmetic coder: '{path}' holds frequency tables that are not "
                        f"increasing over {2 ** bits} codes; write it again with "
                        f"save_code_model")
    return CodeModel(bits=bits, cum=cum)
