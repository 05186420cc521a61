"""Strict JSON and the one schema of an artefact header, checked with types before any use.

Everything in a header is untrusted. :func:`loads_strict` parses JSON without the extensions
Python's ``json`` accepts (``NaN``/``Infinity``, duplicate keys), bounds integers to 64 bits
and nesting to :data:`MAX_DEPTH`, and turns every parser failure into ``ArtefactError``.
:func:`check_header` then validates every field the loader reads (types, ranges, references
between fields) and names the first bad field by its path (``tensors['fc.weight'].shape[1]``).
Semantic checks that need the registries (allowed functions, module types, encodings) stay
with the code that resolves them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from netpress._repr import short_repr
from netpress.errors import ArtefactError

__all__ = ["MAX_DEPTH", "MAX_INT", "loads_strict", "check_header", "check_depth", "short"]

MAX_DEPTH = 64
"""Deepest JSON nesting accepted anywhere in a header (netpress writes fewer than 16 levels)."""
MAX_INT = 2**63 - 1
"""Largest integer magnitude accepted (int64): sizes, offsets and counts all fit."""
_MAX_DIGITS = len(str(MAX_INT))
_MAX_DIMS = 32
_MAX_NAME = 1024
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_ARRAY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")


class _Reject(ValueError):
    pass


def short(value: Any, limit: int = 80) -> str:
    """A repr of ``value`` cut to ``limit`` characters (error messages never print a bomb)."""
    return short_repr(value, limit)


def _no_constant(name: str) -> Any:
    raise _Reject(f"{name} is not JSON (write null or a finite number)")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise _Reject(f"integer {text[:12]}... has {len(text)} digits; at most {_MAX_DIGITS}")
    value = int(text)
    if abs(value) > MAX_INT:
        raise _Reject(f"integer {text} does not fit in 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:20]} overflows a float")
    return value


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise _Reject(f"duplicate key {short(key)}")
        out[key] = value
    return out


def loads_strict(text: bytes | str, what: str) -> Any:
    """Parse strict JSON; ArtefactError naming ``what`` for anything else."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant, parse_int=_int,
                           parse_float=_float, object_pairs_hook=_pairs)
    except RecursionError:
        raise ArtefactError(f"{what} nests deeper than JSON parsing allows") from None
    except (UnicodeDecodeError, json.JSONDecodeError, _Reject, ValueError) as exc:
        raise ArtefactError(f"{what} is not valid JSON ({exc})") from None
    check_depth(value, what)
    return value


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> None:
    """ArtefactError when ``value`` nests lists/dicts deeper than ``limit`` (iterative walk)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise ArtefactError(f"{what} nests deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


# -- typed field checks ------------------------------------------------------------------------
class _Bad(Exception):
    """A schema violation at ``path`` (turned into ArtefactError by check_header)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"header field {path} {message}")


def _need(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise _Bad(path, message)


def _str(v: Any, path: str, max_len: int = _MAX_NAME) -> str:
    _need(isinstance(v, str) and 0 < len(v) <= max_len and v.isprintable(), path,
          f"must be a printable string of 1..{max_len} characters, got {short(v)}")
    return str(v)


def _nat(v: Any, path: str, hi: int = MAX_INT) -> int:
    _need(type(v) is int and 0 <= v <= hi, path,
          f"must be an integer in [0, {hi}], got {short(v)}")
    return int(v)


def _dict(v: Any, path: str) -> dict[str, Any]:
    _need(isinstance(v, dict), path, f"must be a JSON object, got {type(v).__name__}")
    return v  # type: ignore[no-any-return]


def _list(v: Any, path: str) -> list[Any]:
    _need(isinstance(v, list), path, f"must be a JSON list, got {type(v).__name__}")
    return v  # type: ignore[no-any-return]


def _keys(d: Mapping[str, Any], path: str, required: set[str],
          optional: frozenset[str] | set[str] = frozenset(), extra: bool = False) -> None:
    missing = sorted(required - set(d))
    _need(not missing, path, f"lacks {missing}")
    unknown = sorted(set(d) - required - optional)
    _need(extra or not unknown, path, f"has unknown keys {[short(k, 40) for k in unknown[:5]]}")


def _scalar(v: Any, path: str) -> None:
    ok = v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) < 256)
    _need(ok, path, f"must be a number, boolean, null or short string, got {short(v)}")


# -- the header --------------------------------------------------------------------------------
def _tensor_meta(name: str, meta: Any, path: str) -> None:
    from netpress.export.codec import DTYPES

    meta = _dict(meta, path)
    if "alias_of" in meta:
        _keys(meta, path, {"alias_of"}, {"tied"})
        _str(meta["alias_of"], f"{path}.alias_of")
        _need(isinstance(meta.get("tied", False), bool), f"{path}.tied", "must be a boolean")
        return
    _keys(meta, path, {"dtype", "shape", "encoding", "arrays"}, extra=True)
    _need(isinstance(meta["dtype"], str) and meta["dtype"] in DTYPES, f"{path}.dtype",
          f"must be one of {', '.join(DTYPES)}, got {short(meta['dtype'])} (upgrade netpress?)")
    shape = _list(meta["shape"], f"{path}.shape")
    _need(len(shape) <= _MAX_DIMS, f"{path}.shape", f"has more than {_MAX_DIMS} dimensions")
    numel = 1
    for i, d in enumerate(shape):
        numel *= _nat(d, f"{path}.shape[{i}]")
        _need(numel <= MAX_INT, f"{path}.shape", "has more than 2**63 elements")
    _str(meta["encoding"], f"{path}.encoding", 64)
    arrays = _list(meta["arrays"], f"{path}.arrays")
    for i, a in enumerate(arrays):
        _need(isinstance(a, str) and bool(_ARRAY.match(a)), f"{path}.arrays[{i}]",
              f"must be an array name ([A-Za-z0-9_]{{1,64}}), got {short(a)}")
    _need(len(set(arrays)) == len(arrays), f"{path}.arrays", "repeats a name")
    planes = _dict(meta.get("byte_planes", {}), f"{path}.byte_planes")
    for k, code in planes.items():
        _need(k in arrays, f"{path}.byte_planes", f"names unknown array {short(k)}")
        _str(code, f"{path}.byte_planes[{k!r}]", 8)
    for k, v in meta.items():
        if k not in ("dtype", "shape", "encoding", "arrays", "byte_planes"):
            _scalar(v, f"{path}.{short(k, 40)}")


def _tensors(header: dict[str, Any]) -> None:
    tensors = _dict(header["tensors"], "tensors")
    for name, meta in tensors.items():
        path = f"tensors[{short(name, 60)}]"
        _str(name, path)
        _need("/" not in name, path, "must not contain '/'")
        _tensor_meta(name, meta, path)
    for name, meta in tensors.items():
        target = meta.get("alias_of")
        if target is not None:
            _need(target in tensors and "alias_of" not in tensors[target],
                  f"tensors[{short(name, 60)}].alias_of",
                  f"names {short(target)}, which is not a stored tensor")
    keys = _list(header["state_dict"], "state_dict")
    for i, k in enumerate(keys):
        _need(isinstance(k, str) and k in tensors, f"state_dict[{i}]",
              f"must name a tensor in 'tensors', got {short(k)}")
    _need(len(set(keys)) == len(keys), "state_dict", "repeats a name")


def _spec(spec: Any, path: str) -> None:
    spec = _dict(spec, path)
    _keys(spec, path, {"type", "kwargs"})
    _str(spec["type"], f"{path}.type", 256)
    for k in _dict(spec["kwargs"], f"{path}.kwargs"):
        _str(k, f"{path}.kwargs", 128)


def _graph(graph: Any) -> None:
    graph = _dict(graph, "architecture.graph")
    _keys(graph, "architecture.graph", {"version", "nodes", "modules", "attrs"})
    _nat(graph["version"], "architecture.graph.version")
    for path, spec in _dict(graph["modules"], "architecture.graph.modules").items():
        _spec(spec, f"architecture.graph.modules[{short(path, 60)}]")
    for target, info in _dict(graph["attrs"], "architecture.graph.attrs").items():
        where = f"architecture.graph.attrs[{short(target, 60)}]"
        info = _dict(info, where)
        _keys(info, where, {"kind"}, {"requires_grad", "persistent"})
        _need(info["kind"] in ("parameter", "buffer", "constant"), f"{where}.kind",
              f"must be parameter, buffer or constant, got {short(info['kind'])}")
        for flag in ("requires_grad", "persistent"):
            _need(isinstance(info.get(flag, True), bool), f"{where}.{flag}", "must be a boolean")
    nodes = _list(graph["nodes"], "architecture.graph.nodes")
    for i, node in enumerate(nodes):
        where = f"architecture.graph.nodes[{i}]"
        node = _dict(node, where)
        _keys(node, where, {"op", "name", "target", "args", "kwargs"})
        _need(node["op"] in _OPS, f"{where}.op", f"must be one of {_OPS}, got "
              f"{short(node['op'])}")
        _str(node["name"], f"{where}.name", 256)
        _str(node["target"], f"{where}.target", 256)
        _list(node["args"], f"{where}.args")
        _dict(node["kwargs"], f"{where}.kwargs")
    outputs = [i for i, n in enumerate(nodes) if n["op"] == "output"]
    _need(outputs == [len(nodes) - 1], "architecture.graph.nodes",
          "must end with exactly one output node")


def _architecture(header: dict[str, Any]) -> None:
    arch = _dict(header["architecture"], "architecture")
    _keys(arch, "architecture", {"modules"}, {"class", "attributes", "graph", "graph_error",
                                              "verified", "transformers"})
    if "class" in arch:
        _str(arch["class"], "architecture.class")
    if "transformers" in arch:  # a transformers model: its class name and config
        hf = _dict(arch["transformers"], "architecture.transformers")
        _keys(hf, "architecture.transformers", {"class", "config"}, set())
        _str(hf["class"], "architecture.transformers.class")
        _dict(hf["config"], "architecture.transformers.config")
    for k, v in _dict(arch.get("attributes", {}), "architecture.attributes").items():
        _need(type(v) is int, f"architecture.attributes[{short(k, 60)}]",
              f"must be an integer, got {short(v)}")
    for path, spec in _dict(arch["modules"], "architecture.modules").items():
        _spec(spec, f"architecture.modules[{short(path, 60)}]")
    error = arch.get("graph_error")
    _need(error is None or isinstance(error, str), "architecture.graph_error",
          "must be a string or null")
    _need(isinstance(arch.get("verified", False), bool), "architecture.verified",
          "must be a boolean")
    if arch.get("graph") is not None:
        _graph(arch["graph"])


_TOP: dict[str, Callable[[Any, str], Any]] = {
    "netpress_version": lambda v, p: _str(v, p, 64),
    "torch_version": lambda v, p: _str(v, p, 64),
    "payload_bytes": _nat, "payload_raw_bytes": _nat,
    "payload_sha256": lambda v, p: _need(isinstance(v, str) and bool(_HEX64.match(v)), p,
                                         "must be 64 lowercase hex digits"),
}


def check_header(header: Any, where: str, format_version: int) -> None:
    """ArtefactError (prefixed with ``where``) unless ``header`` has the artefact schema."""
    if not isinstance(header, dict) or header.get("format") != "netpress":
        raise ArtefactError(f"{where} is corrupted: its header is not a netpress header")
    version = header.get("format_version")
    if type(version) is not int:
        raise ArtefactError(f"{where} is corrupted: header field format_version must be an "
                            f"integer, got {short(version)}")
    if version != format_version:
        raise ArtefactError(f"{where} has format version {version}; this netpress reads "
                            f"version {format_version}: upgrade netpress")
    if header.get("payload_codec") != "zstd" or header.get("payload_format") != "safetensors":
        raise ArtefactError(f"{where}: unknown payload codec {short(header.get('payload_codec'))}"
                            f"/{short(header.get('payload_format'))}; upgrade netpress")
    try:
        _keys(header, "(top level)", {*_TOP, "tensors", "state_dict", "architecture"},
              {"format", "format_version", "payload_codec", "payload_format", "recipe",
               "metadata", "model_digest"})
        for key, check in _TOP.items():
            check(header[key], key)
        digest = header.get("model_digest")
        _need(digest is None or (isinstance(digest, str) and bool(_DIGEST.match(digest))),
              "model_digest", "must be 'sha256:' and 64 lowercase hex digits")
        _need(header.get("recipe") is None or isinstance(header["recipe"], dict), "recipe",
              "must be a JSON object or null")
        _dict(header.get("metadata", {}), "metadata")
        _tensors(header)
        _architecture(header)
    except _Bad as exc:
        raise ArtefactError(f"{where} is corrupted: {exc}") from None
