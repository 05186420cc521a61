"""A context-model arithmetic coder of the bottleneck's codes.

The per-channel model of :mod:`netpress.split.arith` codes each value ``q[c, i, j]`` with
its channel's frequency table alone, so whatever neighbouring codes share is sent again.
Here each value is coded with a table chosen by the values *already sent* around it (the
codes go in channel-major raster order, as :func:`~netpress.split.arith.encode_codes`
sends them): its *context* is the tuple of the codes at fixed ``offsets`` ``(dc, di, dj)``
before it, e.g. ``(0, 0, -1)`` the code to its left, ``(0, -1, 0)`` the one above, and
``(-1, 0, 0)`` the same position in the previous channel; an offset that falls outside
the latent reads a border symbol ``2^bits``. For each channel and context the model holds a
frequency table over the ``2^bits`` codes::

    p(s | c, ctx) = (n(c, ctx, s) + a * p_c(s)) / (n(c, ctx) + a)

counts ``n`` of the training codes smoothed towards the channel's own (Laplace-smoothed)
pmf ``p_c`` with pseudo-count ``a`` (``strength``; chosen on a fifth of the training codes
held out when not given), so a context seen rarely or never falls back to the per-channel
model. Frequencies are scaled to a total of ``2^15`` (each at least 1), both ends hold
them (``nbytes``: 2 bytes per channel, context and code), and the integer coder of
:mod:`netpress.split.arith` sends one bit string per input, within two bits of
:meth:`ContextModel.ideal_bits`, padded to whole bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from netpress.errors import DataError, RecipeError
from netpress.split.arith import decode_stream, encode_stream

__all__ = ["ContextModel", "DEFAULT_OFFSETS", "fit_context_model", "context_ids",
           "encode_with_context", "decode_with_context", "context_bytes",
           "save_context_model", "load_context_model"]

Offset = tuple[int, int, int]
DEFAULT_OFFSETS: tuple[Offset, ...] = ((0, 0, -1), (0, -1, 0), (-1, 0, 0))
_TOTAL = 2 ** 15
_STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_TYPE, _VERSION = "netpress.split.ContextModel", 1


@dataclass(frozen=True, eq=False)
class ContextModel:
    """Cumulative frequencies ``cum[c, k]`` (length ``2^bits + 1``, ending at the total) of
    the codes of channel ``c`` in context ``k`` (:func:`context_ids`), for codes of
    ``shape`` ``(C, H, W)``."""

    bits: int
    shape: tuple[int, int, int]
    offsets: tuple[Offset, ...]
    cum: np.ndarray = field(repr=False)
    strength: float = 0.0

    @property
    def contexts(self) -> int:
        """Contexts per channel: ``(2^bits + 1) ** len(offsets)``."""
        return int((2 ** self.bits + 1) ** len(self.offsets))

    @property
    def nbytes(self) -> int:
        """Bytes to ship the model: a 2-byte frequency per channel, context and code."""
        return 2 * self.shape[0] * self.contexts * 2 ** self.bits

    @cached_property
    def _rows(self) -> list[list[tuple[int, ...]]]:
        return [[tuple(int(v) for v in row) for row in chan] for chan in self.cum]

    @cached_property
    def _neighbours(self) -> np.ndarray:
        return _neighbour_index(self.shape, self.offsets)

    def ideal_bits(self, codes: np.ndarray) -> float:
        """``sum -log2 p(q | context)`` of one input's codes (the coder's target)."""
        return float(self.code_bits(codes[None]).sum())

    def code_bits(self, codes: np.ndarray) -> np.ndarray:
        """``-log2 p`` of every value of a batch of codes ``(N, C, H, W)`` (same shape)."""
        arr = _check(codes, self.shape, self.bits, batch=True)
        ctx = context_ids(arr, self.bits, self.offsets)
        chan = np.arange(self.shape[0])[None, :, None, None]
        s = arr.astype(np.int64)
        freq = self.cum[chan, ctx, s + 1] - self.cum[chan, ctx, s]
        return -np.log2(freq / self.cum[chan, ctx, -1])


def _check_offsets(offsets: tuple[Offset, ...]) -> None:
    for off in offsets:
        if len(off) != 3 or not (off[0] < 0 or (off[0] == 0 and off[1] < 0)
                                 or (off[0] == 0 and off[1] == 0 and off[2] < 0)):
            raise RecipeError(f"context coder: offset {off} is not a (dc, di, dj) before the "
                              f"coded value in channel-major raster order; use offsets such "
                              f"as (0, 0, -1), (0, -1, 0) or (-1, 0, 0)")


def _check(codes: np.ndarray, shape: tuple[int, ...] | None, bits: int,
           batch: bool) -> np.ndarray:
    arr = np.asarray(codes)
    want = 4 if batch else 3
    if arr.ndim != want or (shape is not None and tuple(arr.shape[-3:]) != tuple(shape)):
        raise DataError(f"context coder: codes of shape {arr.shape} are not "
                        f"{'(N, C, H, W)' if batch else '(C, H, W)'} codes"
                        + (f" of the model's shape {tuple(shape)}" if shape else "")
                        + "; fit the model on codes of this bottleneck")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"context coder: codes of dtype {arr.dtype} are not integers")
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** bits):
        raise DataError(f"context coder: codes outside [0, {2 ** bits - 1}], the range of "
                        f"{bits}-bit codes")
    return arr


def _neighbour_index(shape: tuple[int, int, int], offsets: tuple[Offset, ...]) -> np.ndarray:
    """``(C*H*W, len(offsets))`` flat indices of each value's neighbours, ``C*H*W`` (the
    border slot) where an offset leaves the latent."""
    c, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    n = int(np.prod(shape))
    cols = []
    for dc, di, dj in offsets:
        cc, ii, jj = c + dc, i + di, j + dj
        inside = ((cc >= 0) & (cc < shape[0]) & (ii >= 0) & (ii < shape[1])
                  & (jj >= 0) & (jj < shape[2]))
        flat = (cc * shape[1] + ii) * shape[2] + jj
        cols.append(np.where(inside, flat, n).reshape(-1))
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)


def context_ids(codes: np.ndarray, bits: int, offsets: tuple[Offset, ...]) -> np.ndarray:
    """The context number of every value of ``codes`` ``(N, C, H, W)``:
    ``sum_k v_k (2^bits + 1)^k`` over the neighbours ``v_k`` at ``offsets`` (``2^bits``
    outside the latent)."""
    arr = np.asarray(codes).astype(np.int64)
    shape = tuple(arr.shape[1:])
    nb = _neighbour_index(shape, offsets)  # type: ignore[arg-type]
    flat = arr.reshape(arr.shape[0], -1)
    padded = np.concatenate([flat, np.full((len(flat), 1), 2 ** bits)], axis=1)
    base, ctx = 2 ** bits + 1, np.zeros_like(flat)
    for k in range(nb.shape[1]):
        ctx += padded[:, nb[:, k]] * base ** k
    return ctx.reshape(arr.shape)


def _counts(arr: np.ndarray, bits: int, offsets: tuple[Offset, ...]) -> np.ndarray:
    """Counts ``(C, contexts, 2^bits)`` of each channel's codes in each context."""
    symbols, chans = 2 ** bits, arr.shape[1]
    contexts = (symbols + 1) ** len(offsets)
    ctx = context_ids(arr, bits, offsets)
    chan = np.broadcast_to(np.arange(chans)[None, :, None, None], arr.shape)
    idx = (chan * contexts + ctx) * symbols + arr
    return np.bincount(idx.reshape(-1), minlength=chans * contexts * symbols).reshape(
        chans, contexts, symbols).astype(np.float64)


def _probabilities(counts: np.ndarray, strength: float) -> np.ndarray:
    """Counts smoothed towards each channel's Laplace-smoothed pmf (pseudo-count
    ``strength``)."""
    chan = counts.sum(axis=1) + 1.0
    prior = chan / chan.sum(axis=1, keepdims=True)
    return ((counts + strength * prior[:, None, :])
            / (counts.sum(axis=2, keepdims=True) + strength))


def _choose_strength(arr: np.ndarray, bits: int, offsets: tuple[Offset, ...]) -> float:
    """The pseudo-count of ``_STRENGTHS`` with the least cross-entropy on the last fifth
    of ``arr`` for a model counted on the rest."""
    cut = max(1, len(arr) * 4 // 5)
    if cut >= len(arr):
        return 1.0
    counts = _counts(arr[:cut], bits, offsets)
    held = _counts(arr[cut:], bits, offsets)
    costs = [float(-(held * np.log2(_probabilities(counts, a))).sum()) for a in _STRENGTHS]
    return _STRENGTHS[int(np.argmin(costs))]


def fit_context_model(codes: list[np.ndarray] | np.ndarray, bits: int,
                      offsets: tuple[Offset, ...] = DEFAULT_OFFSETS,
                      strength: float | None = None) -> ContextModel:
    """Fit the context model on training ``codes`` (``(C, H, W)`` arrays, or one
    ``(N, C, H, W)`` array); ``strength=None`` chooses the smoothing on held-out codes."""
    offsets = tuple(tuple(int(v) for v in off) for off in offsets)  # type: ignore[misc]
    _check_offsets(offsets)
    if len(codes) == 0:
        raise DataError("context coder: no codes to fit the model on")
    try:
        stacked = np.stack(list(codes)) if isinstance(codes, list) else np.asarray(codes)
    except ValueError as exc:
        raise DataError(f"context coder: training codes of different shapes ({exc}); fit "
                        f"the model on codes of one bottleneck") from exc
    arr = _check(stacked, None, bits, batch=True)
    if strength is None:
        strength = _choose_strength(arr, bits, offsets)
    elif strength <= 0:
        raise RecipeError(f"context coder: strength {strength} must be positive")
    symbols = 2 ** bits
    p = _probabilities(_counts(arr, bits, offsets), strength)
    freq = np.maximum(1, np.floor(p * (_TOTAL - symbols))).astype(np.int64)
    cum = np.concatenate([np.zeros(freq.shape[:2] + (1,), np.int64),
                          np.cumsum(freq, axis=2)], axis=2)
    return ContextModel(bits=bits, shape=tuple(arr.shape[1:]),  # type: ignore[arg-type]
                        offsets=offsets, cum=cum, strength=float(strength))


def encode_with_context(codes: np.ndarray, model: ContextModel) -> bytes:
    """The arithmetic-coded bytes of one input's codes (shape ``model.shape``)."""
    arr = _check(codes, model.shape, model.bits, batch=False)
    ctx = context_ids(arr[None], model.bits, model.offsets)[0].reshape(-1).tolist()
    per = model.shape[1] * model.shape[2]
    rows = model._rows
    symbols = arr.reshape(-1).astype(np.int64).tolist()
    return encode_stream(symbols, [rows[k // per][c] for k, c in enumerate(ctx)])


def decode_with_context(data: bytes, model: ContextModel) -> np.ndarray:
    """Invert :func:`encode_with_context` (codes of shape ``model.shape``, uint8)."""
    n = int(np.prod(model.shape))
    per = model.shape[1] * model.shape[2]
    nb = model._neighbours.tolist()
    base, border, rows = 2 ** model.bits + 1, 2 ** model.bits, model._rows

    def cum_at(k: int, decoded: list[int]) -> tuple[int, ...]:
        ctx, scale = 0, 1
        for idx in nb[k]:
            ctx += (decoded[idx] if idx < n else border) * scale
            scale *= base
        return rows[k // per][ctx]

    return np.asarray(decode_stream(data, n, cum_at), dtype=np.uint8).reshape(model.shape)


def context_bytes(codes: list[np.ndarray], model: ContextModel) -> np.ndarray:
    """Bytes of each input's context-coded codes."""
    return np.array([len(encode_with_context(c, model)) for c in codes], dtype=np.int64)


def save_context_model(model: ContextModel, path: str | Path) -> Path:
    """Write ``model`` as JSON (type tag, version, shape, offsets, frequencies), atomically."""
    from netpress._atomic import atomic_write

    freq = np.diff(model.cum, axis=2)
    atomic_write(path, json.dumps({
        "type": _TYPE, "version": _VERSION, "bits": model.bits, "shape": list(model.shape),
        "offsets": [list(o) for o in model.offsets], "strength": model.strength,
        "freq": freq.reshape(-1).tolist()}))
    return Path(path)


def load_context_model(path: str | Path) -> ContextModel:
    """Read a model written by :func:`save_context_model`, checking its tables."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("type") != _TYPE or raw.get("version") != _VERSION:
            raise ValueError(f"type {raw.get('type')!r} version {raw.get('version')!r}")
        bits, shape = int(raw["bits"]), tuple(int(v) for v in raw["shape"])
        offsets = tuple(tuple(int(v) for v in o) for o in raw["offsets"])
        freq = np.asarray(raw["freq"], dtype=np.int64)
        freq = freq.reshape(shape[0], (2 ** bits + 1) ** len(offsets), 2 ** bits)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"context coder: '{path}' is not a context model written by "
                        f"save_context_model ({exc})") from exc
    _check_offsets(offsets)  # type: ignore[arg-type]
    if len(shape) != 3 or freq.min() < 1:
        raise DataError(f"context coder: '{path}' holds a shape {shape} or zero frequencies; "
                        f"write it again with save_context_model")
    cum = np.concatenate([np.zeros(freq.shape[:2] + (1,), np.int64),
                          np.cumsum(freq, axis=2)], axis=2)
    return ContextModel(bits=bits, shape=shape, offsets=offsets,  # type: ignore[arg-type]
                        cum=cum, strength=float(raw.get("strength", 0.0)))
