"""The ``.npress`` container: one file with the recipe, the architecture and the tensors.

Layout::

    8 bytes   magic b"NPRESS\\x00" + container version byte (1)
    8 bytes   header length N, uint64 little-endian
    N bytes   header: zstd(UTF-8 JSON) (strict JSON: no NaN/Infinity)
    rest      payload: zstd(safetensors blob of the codec's arrays)

The header records the format version, the netpress and torch versions, the payload codec,
size and SHA-256, the codec metadata of every tensor, the state_dict key order, the caller's
``recipe`` and ``metadata``, the ``architecture`` (the fx graph, or null and why, and the
specs of every rebuildable module) and the ``model_digest``: a SHA-256 over the model alone
(tensor table, key order, architecture and the uncompressed tensor bytes), not over the
recipe, the metadata or the compression level. Two artefacts hold the same model exactly when
their digests are equal (:func:`model_digest`, ``netpress digest``). The header is
zstd-compressed because the graph and tensor table are bulky JSON: ~16% of an 80%-sparse
ResNet-20 artefact as plain text, <1% compressed.

Loading never executes code from the file: no pickle, and graph targets resolve through
allowlists only. It treats the file as hostile: regular files only, the header checked
against one schema (:mod:`._schema`) before use, sizes checked against each other before any
allocation, the payload decompressed as a stream under a cap derived from the declared
tensors, and every failure raised as :class:`~netpress.errors.ArtefactError` naming the file.
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
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

from netpress._atomic import atomic_path
from netpress._inputs import call_model
from netpress.errors import ArtefactError, ModelError, NetpressError
from netpress.export._container import (
    CONTAINER_VERSION,
    FORMAT_VERSION,
    MAGIC,
    MAX_EXPANSION,
    MAX_HEADER_BYTES,
    check_digest,
    check_payload,
    guard,
    model_hash,
    read_head,
)
from netpress.export._payload import (
    SourceLike,
    digest_payload,
    open_source,
    read_tensors,
    write_payload,
)
from netpress.export.codec import bits_equal, encode_tensor
from netpress.export.graph import eval_mode, graph_from_json, graph_tensors, graph_to_json, trace
from netpress.export.modules import apply_specs, leaf_specs

__all__ = [
    "MAGIC",
    "CONTAINER_VERSION",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_EXPANSION",
    "LoadedArtefact",
    "dumps_artefact",
    "save_artefact",
    "load_artefact",
    "read_header",
    "model_digest",
]


@dataclass(frozen=True)
class LoadedArtefact:
    """What :func:`load_artefact` returns."""

    model: nn.Module
    recipe: dict[str, Any] | None
    metadata: dict[str, Any]
    header: dict[str, Any]
    model_digest: str = ""


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
    """The state_dict with its own objects (``keep_vars``): ties are found by identity."""
    state = model.state_dict(keep_vars=True)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"state_dict entry '{key}' of {type(model).__name__} is a "
                             f"{type(value).__name__}, not a tensor; artefacts store tensors only")
        if value.is_meta:
            raise ModelError(f"tensor '{key}' of {type(model).__name__} is on the meta device "
                             "(it has no data); load real weights before saving")
    return state


def _capture_graph(model: nn.Module, state: Mapping[str, torch.Tensor],
                   example_inputs: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph JSON and the extra tensors it needs; NetpressError when it cannot be stored."""
    gm = trace(model)
    graph = graph_to_json(gm)
    extra = {k: v for k, v in graph_tensors(gm).items() if k not in state}
    rebuilt = graph_from_json(graph, {**{k: v.detach() for k, v in state.items()}, **extra})
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
    from netpress.models.hf import transformers_spec
    from netpress.prune.surgery import size_attributes

    arch: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                            "attributes": size_attributes(model)}
    hf = transformers_spec(model)  # transformers models rebuild from their config
    if hf is not None:
        arch["transformers"] = hf
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
    """Codec metadata by tensor name and payload arrays by key; shared tensors stored once
    (``alias_of``), and marked ``tied`` when they are one object (one Parameter)."""
    metas: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in tensors.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            first = seen[key]
            metas[name] = {"alias_of": first, **({"tied": True} if t is tensors[first] else {})}
            continue
        seen[key] = name
        meta, parts = encode_tensor(t.detach(), name=name)
        metas[name] = meta
        arrays.update({f"{name}/{k}": np.ascontiguousarray(a) for k, a in parts.items()})
    return metas, arrays


def _build(model: nn.Module, recipe: dict[str, Any] | None, metadata: dict[str, Any] | None,
           example_inputs: Any, level: int | None) -> tuple[bytes, list[bytes]]:
    """The container prefix and header, and the payload in compressed pieces."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected an nn.Module to save, got {type(model).__name__}")
    recipe_json, metadata_json = _json_bytes(recipe, "recipe"), _json_bytes(metadata or {},
                                                                            "metadata")
    state = _state_tensors(model)
    architecture, extra = _architecture(model, state, example_inputs)
    metas, arrays = _encode_all({**state, **extra})
    section = {"tensors": metas, "state_dict": list(state), "architecture": architecture}
    section = json.loads(_json_bytes(section, "the model description"))
    digest = model_hash(section)
    chunks, raw = write_payload(arrays, level, digest)
    del arrays
    sha = hashlib.sha256()
    for c in chunks:
        sha.update(c)
    header = {
        "format": "netpress", "format_version": FORMAT_VERSION,
        "netpress_version": _netpress_version(), "torch_version": torch.__version__,
        "payload_codec": "zstd", "payload_format": "safetensors",
        "payload_bytes": sum(len(c) for c in chunks), "payload_raw_bytes": raw,
        "payload_sha256": sha.hexdigest(), "model_digest": f"sha256:{digest.hexdigest()}",
        **section,
        "recipe": json.loads(recipe_json), "metadata": json.loads(metadata_json),
    }
    head = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(
        _json_bytes(header, "header"))
    if len(head) > MAX_HEADER_BYTES:
        raise ArtefactError(f"cannot write the artefact: its header takes {len(head)} bytes, "
                            f"more than the {MAX_HEADER_BYTES} a reader accepts; store less "
                            "in recipe/metadata")
    return MAGIC + struct.pack("<Q", len(head)) + head, chunks


def dumps_artefact(model: nn.Module, *, recipe: dict[str, Any] | None = None,
                   metadata: dict[str, Any] | None = None, example_inputs: Any = None,
                   level: int | None = None) -> bytes:
    """The ``.npress`` bytes of ``model`` (see the module docs for the layout).

    ``recipe``/``metadata`` must be strict JSON. With ``example_inputs`` the stored graph is
    checked to reproduce the model's outputs bit for bit (else it is dropped and the
    artefact needs ``model=`` to load). ``level`` is the zstd level; by default 19 for payloads
    up to 16 MiB, 3 above (19 gains ~1.5% there at ~60x the time). The same model, recipe and
    metadata always give the same bytes.
    """
    head, chunks = _build(model, recipe, metadata, example_inputs, level)
    return b"".join((head, *chunks))


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
    head, chunks = _build(model, recipe, metadata, example_inputs, level)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        for piece in (head, *chunks):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    return len(head) + sum(len(c) for c in chunks)


# -- reading -----------------------------------------------------------------------------------
def read_header(source: SourceLike) -> dict[str, Any]:
    """The checked JSON header of an artefact (no payload read, no model built)."""
    with open_source(source) as src:
        return read_head(src)[0]


def model_digest(source: SourceLike) -> str:
    """``"sha256:<hex>"`` of the model an artefact holds, recomputed from its payload.

    It covers the tensors (bit for bit), the state_dict keys and the architecture, not the
    recipe, the metadata (the report's timings) or the compression level: two artefacts hold
    the same model exactly when their digests are equal. ArtefactError for a damaged file.
    """
    with open_source(source) as src:
        header, offset = read_head(src)
        check_payload(src, offset, header, None)
        digest = model_hash(header)
        guard(src.where, "reading the payload",
               lambda: digest_payload(src, offset, header, digest))
        return check_digest(header, digest, src.where)


# -- loading -----------------------------------------------------------------------------------
def _template_copy(template: nn.Module, keys: list[str]) -> nn.Module:
    """A deep copy of ``template`` in which the tensors ``keys`` will replace are meta
    placeholders (no memory): the copy costs the template's structure, not its weights."""
    state = template.state_dict(keep_vars=True)
    memo: dict[int, Any] = {}
    for key in keys:
        t = state.get(key)
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            blank = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(blank, t.requires_grad) \
                if isinstance(t, nn.Parameter) else blank
    return copy.deepcopy(template, memo)


def _retie(model: nn.Module, metas: Mapping[str, Any]) -> None:
    """Make every tensor stored as ``tied`` to another the very same object again."""
    for name, meta in metas.items():
        if not meta.get("tied"):
            continue
        owner_path, _, field = name.rpartition(".")
        source_path, _, source_field = meta["alias_of"].rpartition(".")
        try:
            owner, source = model.get_submodule(owner_path), model.get_submodule(source_path)
        except AttributeError:
            continue
        for table in ("_parameters", "_buffers"):
            mine, theirs = getattr(owner, table), getattr(source, table)
            if field in mine and source_field in theirs and mine[field] is not None:
                mine[field] = theirs[source_field]


def _into_template(template: nn.Module, header: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], strict: bool, where: str) -> nn.Module:
    model = _template_copy(template, header["state_dict"])
    try:
        apply_specs(model, header["architecture"].get("modules") or {}, strict=strict)
    except ArtefactError as exc:
        raise ArtefactError(f"{where}: {exc}") from None
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
    _retie(model, header["tensors"])
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
    gm = graph_from_json(graph, tensors)
    _retie(gm, header["tensors"])
    return gm


def _load_builtin_types() -> None:
    """Register netpress's own module types and tensor encodings (an explicit list, imported
    only when an artefact is loaded so ``import netpress`` stays light)."""
    import netpress.quant  # noqa: F401  (quantized layers + the packed_int encoding)
    import netpress.reconstruct as _reconstruct  # noqa: F401  (group-quantized layers, nm_sparse)


def load_artefact(source: SourceLike, *, model: nn.Module | None = None, strict: bool = True,
                  max_expansion: float | None = MAX_EXPANSION) -> LoadedArtefact:
    """Load an artefact (a path or its bytes) into a working model, in eval mode on the CPU.

    Without ``model`` the module is rebuilt from the stored graph (no user classes needed).
    With ``model`` (a template: an instance of the original architecture) a copy of it is
    used (its weights are not copied: the stored ones replace them), its modules whose
    recorded spec differs (e.g. channels removed by structured pruning) are rebuilt from the
    spec, and the tensors are loaded (``strict`` like ``load_state_dict``). Tied parameters
    come back as one Parameter. ``max_expansion`` refuses files whose model would be more
    than that many times larger than their payload (above 64 MiB); netpress never writes
    such files. Raises ArtefactError naming the file for any defect.
    """
    _load_builtin_types()
    with open_source(source) as src:
        where = src.where
        header, offset = read_head(src)
        check_payload(src, offset, header, max_expansion)
        digest = model_hash(header)
        tensors = guard(where, "decoding the tensors",
                         lambda: read_tensors(src, offset, header, digest))
        value = check_digest(header, digest, where)
    hf = header["architecture"].get("transformers")
    if model is None and header["architecture"].get("graph") is None and hf is not None:
        from netpress.models.hf import build_from_spec  # transformers models: from their config

        model = build_from_spec(hf, where)
    if model is not None:
        built = guard(where, "loading into the template",
                       lambda: _into_template(model, header, tensors, strict, where))
    else:
        built = guard(where, "rebuilding the graph", lambda: _from_graph(header, tensors, where))
    built.eval()
    recipe = header.get("recipe")
    metadata = header.get("metadata")
    return LoadedArtefact(model=built, recipe=recipe if isinstance(recipe, dict) else None,
                          metadata=metadata if isinstance(metadata, dict) else {},
                          header=header, model_digest=value)
