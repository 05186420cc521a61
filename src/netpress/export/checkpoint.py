"""The ``.npress`` container: one file with the recipe, the architecture and the tensors.

Layout::

    8 bytes   magic b"NPRESS\\x00" + container version byte (1)
    8 bytes   header length N, uint64 little-endian
    N bytes   header: zstd(UTF-8 JSON) (strict JSON: no NaN/Infinity)
    rest      payload: zstd(safetensors blob of the codec's arrays)

The header records the format version, the netpress and torch versions, the payload codec,
size and SHA-256, the codec metadata of every tensor, the state_dict key order, the caller's
``recipe`` and ``metadata``, and the ``architecture``: the fx graph (or null and why) and the
specs of every rebuildable module. The header is zstd-compressed because the graph and tensor
table are bulky JSON: ~16% of an 80%-sparse ResNet-20 artefact as plain text, <1% compressed.
Loading never executes code from the file: no pickle, and graph targets resolve through
allowlists only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import safetensors.numpy
import torch
import zstandard
from torch import nn

from netpress._atomic import atomic_write
from netpress._inputs import call_model
from netpress.errors import ArtefactError, ModelError, NetpressError
from netpress.export.codec import bits_equal, decode_tensor, encode_tensor
from netpress.export.graph import eval_mode, graph_from_json, graph_tensors, graph_to_json, trace
from netpress.export.modules import apply_specs, leaf_specs

__all__ = [
    "MAGIC",
    "CONTAINER_VERSION",
    "FORMAT_VERSION",
    "LoadedArtefact",
    "dumps_artefact",
    "save_artefact",
    "load_artefact",
    "read_header",
]

CONTAINER_VERSION = 1
MAGIC = b"NPRESS\x00" + bytes([CONTAINER_VERSION])
FORMAT_VERSION = 1
_PREFIX = len(MAGIC) + 8
_MAX_HEADER = 1 << 30  # bytes, compressed or not
# zstd level 19 makes float payloads only ~1.5% smaller than level 3 but runs ~60x slower
# (~3 MB/s): worth it for small payloads, not for large ones.
_SLOW_LEVEL, _FAST_LEVEL, _SLOW_LIMIT = 19, 3, 16 << 20
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


@dataclass(frozen=True)
class LoadedArtefact:
    """What :func:`load_artefact` returns."""

    model: nn.Module
    recipe: dict[str, Any] | None
    metadata: dict[str, Any]
    header: dict[str, Any]


def _netpress_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netpress")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ArtefactError(f"cannot write the artefact: {what} is not strict JSON ({exc}); use "
                            "dicts, lists, strings, finite numbers, booleans and null") from None


# -- saving ------------------------------------------------------------------------------------
def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"state_dict entry '{key}' of {type(model).__name__} is a "
                             f"{type(value).__name__}, not a tensor; artefacts store tensors only")
    return {k: v.detach() for k, v in state.items()}


def _capture_graph(model: nn.Module, state: Mapping[str, torch.Tensor],
                   example_inputs: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph JSON and the extra tensors it needs; NetpressError when it cannot be stored."""
    gm = trace(model)
    graph = graph_to_json(gm)
    extra = {k: v for k, v in graph_tensors(gm).items() if k not in state}
    rebuilt = graph_from_json(graph, {**state, **extra})
    if example_inputs is not None:
        try:
            with torch.no_grad():
                same = bits_equal(call_model(model, example_inputs),
                                 call_model(rebuilt, example_inputs))
        except Exception as exc:
            raise ModelError(f"the rebuilt graph failed on example_inputs: {exc}") from None
        if not same:
            raise ModelError("the rebuilt graph's outputs differ from the model's on "
                             "example_inputs")
    return graph, extra


def _architecture(model: nn.Module, state: Mapping[str, torch.Tensor],
                  example_inputs: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from netpress.prune.surgery import size_attributes

    arch: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                            "attributes": size_attributes(model)}
    with eval_mode(model):
        arch["modules"] = leaf_specs(model)
        try:
            graph, extra = _capture_graph(model, state, example_inputs)
            arch.update(graph=graph, graph_error=None, verified=example_inputs is not None)
        except Exception as exc:  # the graph is optional: any failure only drops it
            reason = str(exc) if isinstance(exc, NetpressError) else f"{type(exc).__name__}: {exc}"
            graph, extra = None, {}
            arch.update(graph=None, graph_error=reason, verified=False)
    return arch, extra


def _encode_all(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Codec metadata by tensor name and payload arrays by key; shared tensors stored once."""
    metas: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in tensors.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            metas[name] = {"alias_of": seen[key]}
            continue
        seen[key] = name
        meta, parts = encode_tensor(t, name=name)
        metas[name] = meta
        arrays.update({f"{name}/{k}": np.ascontiguousarray(a) for k, a in parts.items()})
    return metas, arrays


def dumps_artefact(model: nn.Module, *, recipe: dict[str, Any] | None = None,
                   metadata: dict[str, Any] | None = None, example_inputs: Any = None,
                   level: int | None = None) -> bytes:
    """The ``.npress`` bytes of ``model`` (see the module docs for the layout).

    ``recipe``/``metadata`` must be strict JSON. With ``example_inputs`` the stored graph is
    checked to reproduce the model's outputs bit for bit (else it is dropped and the
    artefact needs ``model=`` to load). ``level`` is the zstd level; by default 19 for payloads
    up to 16 MiB, 3 above (19 gains ~1.5% there at ~60x the time).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected an nn.Module to save, got {type(model).__name__}")
    recipe_json, metadata_json = _json_bytes(recipe, "recipe"), _json_bytes(metadata or {},
                                                                            "metadata")
    state = _state_tensors(model)
    architecture, extra = _architecture(model, state, example_inputs)
    metas, arrays = _encode_all({**state, **extra})
    raw = safetensors.numpy.save(arrays)
    if level is None:
        level = _SLOW_LEVEL if len(raw) <= _SLOW_LIMIT else _FAST_LEVEL
    payload = zstandard.ZstdCompressor(level=level).compress(raw)
    header = {
        "format": "netpress", "format_version": FORMAT_VERSION,
        "netpress_version": _netpress_version(), "torch_version": torch.__version__,
        "payload_codec": "zstd", "payload_format": "safetensors",
        "payload_bytes": len(payload), "payload_raw_bytes": len(raw),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": metas, "state_dict": list(state),
        "recipe": json.loads(recipe_json), "metadata": json.loads(metadata_json),
        "architecture": architecture,
    }
    head = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(
        _json_bytes(header, "header"))
    return b"".join((MAGIC, struct.pack("<Q", len(head)), head, payload))


def save_artefact(path: str | os.PathLike[str], model: nn.Module, *,
                  recipe: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                  example_inputs: Any = None, level: int | None = None) -> int:
    """Write :func:`dumps_artefact` to ``path`` atomically; returns the bytes written.

    The bytes go to a temporary file in the same folder, then replace ``path`` in one step: a
    failure leaves no partial file and any existing ``path`` intact.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ArtefactError(f"cannot save to '{target}': folder '{parent}' does not exist; "
                            "create it first")
    if target.is_dir():
        raise ArtefactError(f"cannot save to '{target}': it is a folder; give a file name")
    data = dumps_artefact(model, recipe=recipe, metadata=metadata,
                          example_inputs=example_inputs, level=level)
    return atomic_write(target, data)


# -- reading -----------------------------------------------------------------------------------
def _read_source(source: Source, *, limit: int | None = None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return (data if limit is None else data[:limit]), "<bytes>"
    path = Path(source)
    where = f"'{path}'"
    if not path.exists():
        raise ArtefactError(f"{where}: no such file")
    if path.is_dir():
        raise ArtefactError(f"{where} is a folder, not a .npress file")
    with path.open("rb") as f:
        return f.read() if limit is None else f.read(limit), where


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


def _split(data: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    """The parsed header and the payload bytes (checked against the header's size)."""
    if len(data) < _PREFIX:
        if data and MAGIC.startswith(data[: len(MAGIC)]):
            raise ArtefactError(f"{where} is truncated ({len(data)} bytes); re-export it")
        raise ArtefactError(f"{where} is not a netpress artefact: {_sniff(data)}")
    if data[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise ArtefactError(f"{where} is not a netpress artefact: {_sniff(data)}")
    if data[len(MAGIC) - 1] != CONTAINER_VERSION:
        raise ArtefactError(f"{where} uses container version {data[len(MAGIC) - 1]}; this "
                            f"netpress reads version {CONTAINER_VERSION}: upgrade netpress")
    (size,) = struct.unpack("<Q", data[len(MAGIC):_PREFIX])
    if size > _MAX_HEADER:
        raise ArtefactError(f"{where} is corrupted: header length {size} is implausible")
    if len(data) < _PREFIX + size:
        raise ArtefactError(f"{where} is truncated: the header needs {size} bytes, only "
                            f"{len(data) - _PREFIX} are present; re-export it")
    header = _parse_header(data[_PREFIX:_PREFIX + size], where)
    _check_header(header, where)
    return header, data[_PREFIX + size:]


def _parse_header(blob: bytes, where: str) -> Any:
    try:
        if not 0 <= zstandard.frame_content_size(blob) <= _MAX_HEADER:
            raise zstandard.ZstdError("the frame does not declare a plausible size")
        text = zstandard.ZstdDecompressor().decompress(blob)
    except zstandard.ZstdError as exc:
        raise ArtefactError(f"{where} is corrupted: cannot decompress its header ({exc})") \
            from None
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactError(f"{where} is corrupted: its header is not valid JSON ({exc})") \
            from None


def _check_header(header: Any, where: str) -> None:
    if not isinstance(header, dict) or header.get("format") != "netpress":
        raise ArtefactError(f"{where} is corrupted: its header is not a netpress header")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtefactError(f"{where} has format version {version!r}; this netpress reads "
                            f"version {FORMAT_VERSION}: upgrade netpress")
    expected = {"payload_bytes": int, "payload_raw_bytes": int, "payload_sha256": str,
                "tensors": dict, "state_dict": list, "architecture": dict}
    for key, kind in expected.items():
        if not isinstance(header.get(key), kind):
            raise ArtefactError(f"{where} is corrupted: header field '{key}' is missing or not "
                                f"a {kind.__name__}")
    if header.get("payload_codec") != "zstd" or header.get("payload_format") != "safetensors":
        raise ArtefactError(f"{where}: unknown payload codec {header.get('payload_codec')!r}/"
                            f"{header.get('payload_format')!r}; upgrade netpress")


def read_header(source: Source) -> dict[str, Any]:
    """The JSON header of an artefact (no payload read, no model built)."""
    data, where = _read_source(source, limit=_PREFIX)
    if len(data) == _PREFIX and data[: len(MAGIC)] == MAGIC:
        (size,) = struct.unpack("<Q", data[len(MAGIC):])
        if size <= _MAX_HEADER:
            data, where = _read_source(source, limit=_PREFIX + size)
    return _split(data, where)[0]


def _payload_arrays(header: Mapping[str, Any], payload: bytes, where: str) -> dict[str, Any]:
    expected = header["payload_bytes"]
    if len(payload) < expected:
        raise ArtefactError(f"{where} is truncated: the payload should be {expected} bytes, "
                            f"only {len(payload)} are present; re-export it")
    if len(payload) > expected:
        raise ArtefactError(f"{where} is corrupted: {len(payload) - expected} unexpected bytes "
                            "follow the payload")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["payload_sha256"]:
        raise ArtefactError(f"{where} is corrupted: payload checksum mismatch (SHA-256 "
                            f"{digest[:12]}..., header says {str(header['payload_sha256'])[:12]}"
                            "...); the file changed after it was written: re-export it")
    try:
        if zstandard.frame_content_size(payload) != header["payload_raw_bytes"]:
            raise zstandard.ZstdError("frame size differs from the header's payload_raw_bytes")
        raw = zstandard.ZstdDecompressor().decompress(payload)
        return dict(safetensors.numpy.load(raw))
    except Exception as exc:  # zstd / safetensors raise several types
        raise ArtefactError(f"{where} is corrupted: cannot unpack the payload ({exc})") from None


def _decode_all(header: Mapping[str, Any], arrays: Mapping[str, Any],
                where: str) -> dict[str, torch.Tensor]:
    metas: Mapping[str, Any] = header["tensors"]
    grouped: dict[str, dict[str, Any]] = {name: {} for name in metas}
    for key, arr in arrays.items():
        name, _, part = key.rpartition("/")
        if name not in grouped:
            raise ArtefactError(f"{where} is inconsistent: payload array '{key}' belongs to no "
                                "tensor in the header")
        grouped[name][part] = arr
    out: dict[str, torch.Tensor] = {}
    aliases = {n: m["alias_of"] for n, m in metas.items()
               if isinstance(m, dict) and "alias_of" in m}
    try:
        for name, meta in metas.items():
            if name not in aliases:
                out[name] = decode_tensor(meta, grouped[name], name=name)
    except ArtefactError as exc:
        raise ArtefactError(f"{where} is inconsistent: {exc}") from None
    for name, target in aliases.items():
        if target not in out:
            raise ArtefactError(f"{where} is inconsistent: tensor '{name}' aliases unknown "
                                f"tensor {target!r}")
        out[name] = out[target]
    return out


# -- loading -----------------------------------------------------------------------------------
def _into_template(template: nn.Module, header: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], strict: bool, where: str) -> nn.Module:
    model = copy.deepcopy(template)
    try:
        apply_specs(model, header["architecture"].get("modules") or {}, strict=strict)
    except ArtefactError as exc:
        raise ArtefactError(f"{where}: {exc}") from None
    missing = [k for k in header["state_dict"] if k not in tensors]
    if missing:
        raise ArtefactError(f"{where} is inconsistent: state_dict tensors {missing[:5]} are "
                            "not stored")
    # Layers without a rebuildable spec (e.g. transformers' Conv1D) and head-count attributes
    # follow the stored shapes; standard layers were rebuilt from their specs above.
    from netpress.prune.surgery import reshape_template

    reshape_template(model, {k: tuple(tensors[k].shape) for k in header["state_dict"]},
                     header["architecture"].get("attributes"))
    try:
        model.load_state_dict({k: tensors[k] for k in header["state_dict"]}, strict=strict,
                              assign=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())
        raise ArtefactError(f"{where}: the stored tensors do not fit the template "
                            f"{type(template).__name__}: {reason}") from None
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise ArtefactError(f"{where}: tensors {unfilled[:5]} of rebuilt modules are not stored "
                            "in the artefact (loaded with strict=False?)")
    return model.to("cpu")


def _from_graph(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                where: str) -> nn.Module:
    arch = header["architecture"]
    graph = arch.get("graph")
    if graph is None:
        reason = arch.get("graph_error") or "its graph was not recorded"
        raise ArtefactError(f"{where}: this artefact holds no graph because {reason}; pass "
                            "model=<an instance of the original architecture> to load it")
    try:
        return graph_from_json(graph, tensors)
    except ArtefactError as exc:
        raise ArtefactError(f"{where}: {exc}") from None


def _load_builtin_types() -> None:
    """Register netpress's own module types and tensor encodings (an explicit list, imported
    only when an artefact is loaded so ``import netpress`` stays light)."""
    import netpress.quant  # noqa: F401  (quantized layers + the packed_int encoding)


def load_artefact(source: Source, *, model: nn.Module | None = None,
                  strict: bool = True) -> LoadedArtefact:
    """Load an artefact (a path or its bytes) into a working model, in eval mode on the CPU.

    Without ``model`` the module is rebuilt from the stored graph (no user classes needed).
    With ``model`` (a template: an instance of the original architecture) a deep copy of it
    is used, its modules whose recorded spec differs (e.g. channels removed by structured
    pruning) are rebuilt from the spec, and the tensors are loaded (``strict`` like
    ``load_state_dict``). Raises ArtefactError naming the file for any defect.
    """
    _load_builtin_types()
    data, where = _read_source(source)
    header, payload = _split(data, where)
    tensors = _decode_all(header, _payload_arrays(header, payload, where), where)
    if model is not None:
        built = _into_template(model, header, tensors, strict, where)
    else:
        built = _from_graph(header, tensors, where)
    built.eval()
    recipe = header.get("recipe")
    metadata = header.get("metadata")
    return LoadedArtefact(model=built, recipe=recipe if isinstance(recipe, dict) else None,
                          metadata=metadata if isinstance(metadata, dict) else {}, header=header)
