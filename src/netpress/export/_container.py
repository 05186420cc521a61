"""Reading the ``.npress`` container defensively: magic, header, sizes, checksums, digest.

Everything here runs before a tensor is decoded or a module built: the header is read under a
size cap and checked against the schema (:mod:`._schema`); the payload's sizes are checked
against each other and against the declared tensors, and its checksum verified, before it is
decompressed. :func:`guard` turns any failure past these checks into an ArtefactError that
names the file (never a MemoryError: that would hide a missing cap).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import zstandard

from netpress.errors import ArtefactError
from netpress.export._payload import Source, decoded_bytes, raw_bound, sha256_of
from netpress.export._schema import check_header, loads_strict

__all__ = ["CONTAINER_VERSION", "MAGIC", "FORMAT_VERSION", "PREFIX", "MAX_HEADER_BYTES",
           "MAX_EXPANSION", "model_hash", "read_head", "check_payload", "check_digest",
           "guard"]

T = TypeVar("T")
CONTAINER_VERSION = 1
MAGIC = b"NPRESS\x00" + bytes([CONTAINER_VERSION])
FORMAT_VERSION = 1
PREFIX = len(MAGIC) + 8
MAX_HEADER_BYTES = 16 << 20
"""Largest header accepted, compressed or not (netpress writes well under 1 MiB for BERT)."""
MAX_EXPANSION = 1024.0
"""Default limit on how much larger than the file's payload the decoded model may be."""
_EXPANSION_FLOOR = 64 << 20  # below this many bytes any expansion is accepted


def model_hash(header: Mapping[str, Any]) -> Any:
    """SHA-256 started on the model section of ``header`` (the raw payload follows)."""
    arch = {k: v for k, v in header["architecture"].items() if k != "graph_error"}
    section = {"tensors": header["tensors"], "state_dict": header["state_dict"],
               "architecture": arch}
    h = hashlib.sha256(b"netpress-model-1\0")
    h.update(json.dumps(section, sort_keys=True, ensure_ascii=False, allow_nan=False,
                        separators=(",", ":")).encode("utf-8"))
    h.update(b"\0")
    return h


def _sniff(data: bytes) -> str:
    """A guess at what a non-netpress file is, for the error message."""
    if not data:
        return "the file is empty"
    if data.startswith(b"PK\x03\x04"):
        return ("it is a zip archive, like a torch.save checkpoint; netpress never unpickles "
                "files: load it with torch.load(..., weights_only=True) and save the model "
                "with netpress.export.save_artefact")
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it is a pickle (a legacy torch.save file?); netpress never unpickles files"
    if len(data) >= 10 and data[8:10] == b'{"':
        return "it looks like a safetensors file; load it with safetensors.torch.load_file"
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return "it is a zstd stream, not a netpress container"
    if data.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed; decompress it first"
    if data.startswith(b"NPRESS"):
        return "its magic is damaged; the file is corrupted"
    return f"it starts with {data[:16]!r}"


def read_head(src: Source) -> tuple[dict[str, Any], int]:
    """The checked header and the payload's offset."""
    where = src.where
    data = src.read(0, PREFIX)
    if len(data) < PREFIX:
        if data and MAGIC.startswith(data[: len(MAGIC)]):
            raise ArtefactError(f"{where} is truncated ({len(data)} bytes); re-export it")
        raise ArtefactError(f"{where} is not a netpress artefact: {_sniff(src.read(0, 16))}")
    if data[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise ArtefactError(f"{where} is not a netpress artefact: {_sniff(data)}")
    if data[len(MAGIC) - 1] != CONTAINER_VERSION:
        raise ArtefactError(f"{where} uses container version {data[len(MAGIC) - 1]}; this "
                            f"netpress reads version {CONTAINER_VERSION}: upgrade netpress")
    (size,) = struct.unpack("<Q", data[len(MAGIC):PREFIX])
    if size > MAX_HEADER_BYTES:
        raise ArtefactError(f"{where} is corrupted: header length {size} is implausible "
                            f"(netpress reads headers up to {MAX_HEADER_BYTES} bytes)")
    if src.size < PREFIX + size:
        raise ArtefactError(f"{where} is truncated: the header needs {size} bytes, only "
                            f"{src.size - PREFIX} are present; re-export it")
    header = _parse_header(src.read(PREFIX, size), where)
    guard(where, "checking the header", lambda: check_header(header, where, FORMAT_VERSION))
    return header, PREFIX + size


def _parse_header(blob: bytes, where: str) -> Any:
    try:
        declared = zstandard.frame_content_size(blob)
        if not 0 <= declared <= MAX_HEADER_BYTES:
            raise zstandard.ZstdError(f"the frame declares {declared} bytes (at most "
                                      f"{MAX_HEADER_BYTES} accepted)")
        text = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_HEADER_BYTES)
    except zstandard.ZstdError as exc:
        raise ArtefactError(f"{where} is corrupted: cannot decompress its header ({exc})") \
            from None
    return loads_strict(text, f"{where} is corrupted: its header")


def check_payload(src: Source, offset: int, header: Mapping[str, Any],
                   max_expansion: float | None) -> None:
    """Sizes and checksum of the payload, all before any decompression."""
    where, expected = src.where, header["payload_bytes"]
    have = src.size - offset
    if have < expected:
        raise ArtefactError(f"{where} is truncated: the payload should be {expected} bytes, "
                            f"only {have} are present; re-export it")
    if have > expected:
        raise ArtefactError(f"{where} is corrupted: {have - expected} unexpected bytes "
                            "follow the payload")
    raw, bound = header["payload_raw_bytes"], raw_bound(header["tensors"])
    if raw > bound:
        raise ArtefactError(f"{where} is corrupted: payload_raw_bytes {raw} exceeds the {bound} "
                            "bytes its declared tensors can need")
    decoded = decoded_bytes(header["tensors"])
    if max_expansion is not None and max(raw, decoded) > max(_EXPANSION_FLOOR,
                                                             max_expansion * expected):
        raise ArtefactError(f"{where}: its {expected}-byte payload would expand to "
                            f"{max(raw, decoded)} bytes, more than max_expansion="
                            f"{max_expansion:g} times; netpress never writes such files (a "
                            "decompression bomb?). Pass max_expansion=None to load a file you "
                            "trust")
    digest = sha256_of(src, offset, expected)
    if digest != header["payload_sha256"]:
        raise ArtefactError(f"{where} is corrupted: payload checksum mismatch (SHA-256 "
                            f"{digest[:12]}..., header says {header['payload_sha256'][:12]}"
                            "...); the file changed after it was written: re-export it")


def check_digest(header: Mapping[str, Any], digest: Any, where: str) -> str:
    value = f"sha256:{digest.hexdigest()}"
    stored = header.get("model_digest")
    if stored is not None and stored != value:
        raise ArtefactError(f"{where} is corrupted: its model section does not match its "
                            "model_digest; the header was edited after it was written")
    return value


def guard(where: str, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; any failure but a MemoryError becomes an ArtefactError naming ``where``."""
    try:
        return fn()
    except MemoryError:
        raise
    except ArtefactError as exc:
        text = str(exc)
        raise ArtefactError(text if text.startswith(where) else f"{where}: {text}") from None
    except RecursionError:
        raise ArtefactError(f"{where}: {what} nests too deeply") from None
    except Exception as exc:
        raise ArtefactError(f"{where}: {what} failed: {type(exc).__name__}: "
                            f"{str(exc)[:300]}") from None
