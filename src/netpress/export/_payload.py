"""The artefact payload, written and read as a stream: memory stays near one model copy.

The payload is one zstd frame of a safetensors blob (8-byte index length, JSON index, the
arrays' bytes). :func:`write_payload` streams the arrays into the compressor (no joined raw
copy); :func:`read_tensors` decompresses array by array, checks the index against the
header's tensor table **before** allocating anything, and decodes each tensor as soon as its
arrays are in. :class:`Source` opens what the caller gave: bytes, or a *regular* file (FIFOs,
devices and folders are refused, so a read can neither block nor run forever).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch
import zstandard

from netpress.errors import ArtefactError
from netpress.export._schema import loads_strict, short
from netpress.export.codec import DTYPES, decode_tensor

__all__ = ["Source", "open_source", "write_payload", "read_tensors", "raw_bound",
           "decoded_bytes", "sha256_of", "digest_payload", "SourceLike"]

SourceLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
_ST_DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8")}
_ST_NAMES = {(d.kind, d.itemsize): n for n, d in _ST_DTYPES.items()}
_CHUNK = 1 << 20
_MAX_INDEX = 16 << 20
# zstd level 19 makes float payloads only ~1.5% smaller than level 3 but runs ~60x slower
# (~3 MB/s): worth it for small payloads, not for large ones.
_SLOW_LEVEL, _FAST_LEVEL, _SLOW_LIMIT = 19, 3, 16 << 20


# -- the source --------------------------------------------------------------------------------
@dataclass
class Source:
    """An opened artefact: random access to bytes in memory or in a regular file."""

    where: str
    size: int
    data: memoryview | None = None
    file: BinaryIO | None = None

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset`` (fewer when the source ends first)."""
        if self.data is not None:
            return bytes(self.data[offset:offset + n])
        assert self.file is not None
        self.file.seek(offset)
        return self.file.read(n)

    def chunks(self, offset: int, n: int) -> Iterator[memoryview | bytes]:
        """The ``n`` bytes at ``offset`` in pieces of at most 1 MiB."""
        end = offset + n
        while offset < end:
            piece = self.read(offset, min(_CHUNK, end - offset)) if self.data is None \
                else self.data[offset:min(offset + _CHUNK, end)]
            if not piece:
                return
            offset += len(piece)
            yield piece

    def stream(self, offset: int) -> Any:
        """A readable from ``offset`` to the end (for the zstd stream reader)."""
        if self.data is not None:
            return self.data[offset:]
        assert self.file is not None
        self.file.seek(offset)
        return self.file


@contextmanager
def open_source(source: SourceLike) -> Iterator[Source]:
    """Open bytes or a path; ArtefactError for missing files, folders and non-regular files."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        yield Source("<bytes>", len(view), data=view)
        return
    path = Path(source)
    where = f"'{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtefactError(f"{where}: no such file") from None
    except OSError as exc:
        raise ArtefactError(f"{where}: cannot open it ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ArtefactError(f"{where} is a folder, not a .npress file")
        raise ArtefactError(f"{where} is not a regular file (a FIFO, device or socket); "
                            "netpress reads artefacts from regular files only: copy it to a "
                            "file first")
    with os.fdopen(fd, "rb") as f:
        yield Source(where, info.st_size, file=f)


# -- writing -----------------------------------------------------------------------------------
def _le(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))


def write_payload(arrays: Mapping[str, np.ndarray], level: int | None,
                  digest: Any) -> tuple[list[bytes], int]:
    """Compress the safetensors blob of ``arrays`` as a stream: ``(zstd chunks, raw size)``.

    ``digest`` (a hashlib object) is fed the raw blob on the way.
    """
    index: dict[str, Any] = {}
    offset = 0
    for key, a in arrays.items():
        name = _ST_NAMES.get((a.dtype.kind, a.dtype.itemsize))
        if name is None:
            raise ArtefactError(f"cannot store array '{key}' of dtype {a.dtype}")
        index[key] = {"dtype": name, "shape": list(a.shape),
                      "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(index, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    raw = 8 + len(head) + offset
    if level is None:
        level = _SLOW_LEVEL if raw <= _SLOW_LIMIT else _FAST_LEVEL
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=raw)
    chunks: list[bytes] = []

    def feed(piece: bytes | memoryview) -> None:
        digest.update(piece)
        out = compressor.compress(piece)
        if out:
            chunks.append(out)

    feed(struct.pack("<Q", len(head)) + head)
    for a in arrays.values():
        if a.nbytes:
            feed(_le(a).reshape(-1).view(np.uint8).data)
    chunks.append(compressor.flush())
    return chunks, raw


# -- reading -----------------------------------------------------------------------------------
def decoded_bytes(metas: Mapping[str, Any]) -> int:
    """Bytes the stored tensors take once decoded (shared tensors counted once)."""
    total = 0
    for meta in metas.values():
        if "alias_of" not in meta:
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n * torch.empty((), dtype=DTYPES[meta["dtype"]]).element_size()
    return total


def raw_bound(metas: Mapping[str, Any]) -> int:
    """The largest raw payload the declared tensors can need with any netpress encoding
    (dense, bitmask or packed: at most one extra byte per element), plus the index."""
    total = 8 + 4096
    for name, meta in metas.items():
        if "alias_of" in meta:
            continue
        n = 1
        for d in meta["shape"]:
            n *= d
        size = torch.empty((), dtype=DTYPES[meta["dtype"]]).element_size()
        total += n * (size + 1) + 64 + sum(len(name) + len(a) + 128 for a in meta["arrays"])
    return total


@dataclass
class _Entry:
    key: str
    tensor: str
    part: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class _Index:
    entries: list[_Entry] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # arrays still missing per tensor


def _check_index(index: Any, data_bytes: int, metas: Mapping[str, Any]) -> _Index:
    """The payload's array table, checked against the header's tensors."""
    if not isinstance(index, dict):
        raise ArtefactError("the payload index is not a JSON object")
    out = _Index(parts={n: len(m["arrays"]) for n, m in metas.items() if "alias_of" not in m})
    for key, info in index.items():
        if key == "__metadata__":
            continue
        tensor, _, part = key.rpartition("/")
        meta = metas.get(tensor)
        if meta is None or "alias_of" in meta or part not in meta["arrays"]:
            raise ArtefactError(f"payload array {short(key)} belongs to no tensor in the header")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ArtefactError(f"payload array '{key}' has a malformed entry {short(info)}")
        dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None or not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape) or not isinstance(offsets, list) \
                or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise ArtefactError(f"payload array '{key}' has a malformed entry {short(info)}")
        n = int(np.prod(shape, dtype=object)) if shape else 1
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != n * dtype.itemsize:
            raise ArtefactError(f"payload array '{key}' declares {n} x {dtype.itemsize} bytes "
                                f"at offsets {offsets}, which do not fit the payload")
        out.entries.append(_Entry(key, tensor, part, dtype, tuple(shape), begin, end))
    out.entries.sort(key=lambda e: (e.begin, e.end))
    at = 0
    for e in out.entries:
        if e.begin != at:
            raise ArtefactError(f"payload array '{e.key}' starts at {e.begin}, expected {at} "
                                "(arrays must tile the payload)")
        at = e.end
    if at != data_bytes:
        raise ArtefactError(f"the payload arrays cover {at} of its {data_bytes} data bytes")
    seen = {(e.tensor, e.part) for e in out.entries}
    if len(seen) != len(out.entries):
        raise ArtefactError("the payload index lists an array twice")
    missing = [f"{n}/{a}" for n, m in metas.items() if "alias_of" not in m
               for a in m["arrays"] if (n, a) not in seen]
    if missing:
        raise ArtefactError(f"the payload lacks arrays {missing[:5]} that the header lists")
    return out


def _read_exact(reader: Any, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = reader.readinto(view[got:])
        if not k:
            raise ArtefactError(f"the payload ends inside {what} ({got} of {n} bytes)")
        got += k
    return buf


def _open_frame(src: Source, offset: int, raw: int) -> Any:
    if zstandard.frame_content_size(src.read(offset, 18)) != raw:
        raise ArtefactError("the payload frame does not declare the header's "
                            f"payload_raw_bytes ({raw})")
    return zstandard.ZstdDecompressor().stream_reader(src.stream(offset), read_size=_CHUNK,
                                                      read_across_frames=False)


def digest_payload(src: Source, offset: int, header: Mapping[str, Any], digest: Any) -> None:
    """Feed the raw payload to ``digest`` without decoding it (bounded memory)."""
    raw = header["payload_raw_bytes"]
    reader = _open_frame(src, offset, raw)
    left = raw
    while left:
        piece = reader.read(min(_CHUNK, left))
        if not piece:
            raise ArtefactError(f"the payload ends {left} bytes early")
        digest.update(piece)
        left -= len(piece)
    if reader.read(1):
        raise ArtefactError(f"the payload decompresses to more than its {raw} bytes")


def read_tensors(src: Source, offset: int, header: Mapping[str, Any],
                 digest: Any) -> dict[str, torch.Tensor]:
    """Decode every stored tensor from the payload at ``offset`` (header already checked).

    ``digest`` is fed the raw blob. Raises ArtefactError (without the file's name) for any
    inconsistency; memory is bounded by the header's declared tensors, checked beforehand.
    """
    metas: Mapping[str, Any] = header["tensors"]
    raw = header["payload_raw_bytes"]
    reader = _open_frame(src, offset, raw)
    head = _read_exact(reader, 8, "the index length")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(_MAX_INDEX, raw - 8):
        raise ArtefactError(f"the payload index length {n} is implausible")
    index_bytes = _read_exact(reader, n, "the index")
    digest.update(head)
    digest.update(index_bytes)
    index = _check_index(loads_strict(bytes(index_bytes), "the payload index"), raw - 8 - n,
                         metas)
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, count in index.parts.items():
        if count == 0:
            out[name] = decode_tensor(metas[name], {}, name=name, owned=True)
    for e in index.entries:
        buf = _read_exact(reader, e.end - e.begin, f"array '{e.key}'")
        digest.update(buf)
        arrays = pending.setdefault(e.tensor, {})
        arrays[e.part] = np.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
        if len(arrays) == index.parts[e.tensor]:
            out[e.tensor] = decode_tensor(metas[e.tensor], pending.pop(e.tensor), name=e.tensor,
                                          owned=True)
    if reader.read(1):
        raise ArtefactError(f"the payload decompresses to more than its {raw} bytes")
    for name, meta in metas.items():
        if "alias_of" in meta:
            out[name] = out[meta["alias_of"]]
    return out


def sha256_of(src: Source, offset: int, n: int) -> str:
    """SHA-256 of ``n`` bytes at ``offset``, read in pieces."""
    h = hashlib.sha256()
    for piece in src.chunks(offset, n):
        h.update(piece)
    return h.hexdigest()
