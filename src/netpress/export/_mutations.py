"""The fuzzer's mutations: each breaks a valid artefact one way (see :mod:`._fuzz`).

:func:`split` takes a valid artefact apart (header, uncompressed payload); :func:`seal` puts
a possibly edited one back together with matching sizes, checksums and model digest, so that
an edit reaches the checks behind the integrity checks. :data:`MUTATORS` lists every class.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

__all__ = ["Parts", "split", "seal", "rename_arrays", "warm_bombs", "MUTATORS", "HOSTILE_NAMES"]

HOSTILE_NAMES = ("self", "torch", "getattr", "input", "forward", "training", "_modules",
                 "eval", "graph", "code", "__class__", "device", "inf", "a.b", "0", "", "x y",
                 "__globals__", "load_state_dict", "os")


# -- taking an artefact apart and putting it back ------------------------------------------------
@dataclass
class Parts:
    header: dict[str, Any]
    raw: bytes


def split(data: bytes) -> Parts:
    """The header and the uncompressed payload of a valid artefact."""
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[16:16 + n]))
    raw = zstandard.ZstdDecompressor().decompress(data[16 + n:])
    return Parts(header, raw)


def seal(header: dict[str, Any], raw: bytes | None = None, payload: bytes | None = None,
         *, digest: bool = True, head_text: bytes | None = None) -> bytes:
    """A container from ``header`` and a payload (``raw`` recompressed, or ``payload`` as is);
    sizes and checksums are made to match, the model digest too when ``digest``."""
    if payload is None:
        assert raw is not None
        payload = zstandard.ZstdCompressor(level=1).compress(raw)
        header["payload_raw_bytes"] = len(raw)
    header["payload_bytes"] = len(payload)
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    if digest and raw is not None:
        header["model_digest"] = _digest(header, raw)
    text = head_text if head_text is not None else json.dumps(header).encode()
    head = zstandard.ZstdCompressor(level=1).compress(text)
    return data_prefix() + struct.pack("<Q", len(head)) + head + payload


def data_prefix() -> bytes:
    from netpress.export.checkpoint import MAGIC

    return MAGIC


def _digest(header: dict[str, Any], raw: bytes) -> Any:
    try:
        from netpress.export._container import model_hash

        h = model_hash(header)
    except Exception:  # the mutation made the header unhashable: leave the digest as it was
        return header.get("model_digest")
    h.update(raw)
    return f"sha256:{h.hexdigest()}"


# -- mutations ---------------------------------------------------------------------------------
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def _hostile_value(rng: random.Random, header: dict[str, Any]) -> Any:
    pick = rng.randrange(14)
    return [None, True, False, 0, -1, 2**63 - 1, 2**63 + rng.randrange(9), 1.5, 1e308,
            rng.choice(HOSTILE_NAMES), "x" * rng.choice((1, 300, 5000)),
            [rng.choice((0, "a", None))] * rng.choice((0, 1, 3)),
            {rng.choice(("tuple", "size", "slice", "dict", "alias_of", "node", "dtype",
                         "float", "device")): rng.choice((["a", 1.5], "x", 3, [2**40], None))},
            rng.choice(_paths_values(header))][pick]


def _paths_values(header: dict[str, Any]) -> list[Any]:
    return [v for v in (header.get("format_version"), header.get("tensors"), header.get(
        "state_dict"), header.get("payload_bytes")) if v is not None]


def m_bitflip(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_bitflip_raw(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    raw = bytearray(parts.raw)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw)) if rng.random() < 0.5 else rng.randrange(min(len(raw), 400))
        raw[i] ^= 1 << rng.randrange(8)
    return seal(copy.deepcopy(parts.header), bytes(raw))


def m_truncate(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    return data[:rng.randrange(len(data))]


def m_append(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    return data + rng.randbytes(rng.randint(1, 64))


def m_header_value(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    header = copy.deepcopy(parts.header)
    path = rng.choice(_paths(header)[1:])
    _set(header, path, _hostile_value(rng, parts.header))
    return seal(header, parts.raw, digest=rng.random() < 0.9)


def m_header_keys(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    header = copy.deepcopy(parts.header)
    dicts = [p for p in _paths(header) if isinstance(_get(header, p), dict) and _get(header, p)]
    path = rng.choice(dicts)
    target = _get(header, path)
    if rng.random() < 0.5:
        del target[rng.choice(list(target))]
    else:
        target[rng.choice(HOSTILE_NAMES) or "extra"] = _hostile_value(rng, parts.header)
    return seal(header, parts.raw)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def m_header_text(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Non-strict JSON the writer never produces: NaN, 1.0 versions, duplicate keys, huge or
    long numbers, deep nesting."""
    header = copy.deepcopy(parts.header)
    text = json.dumps(header)
    kind = rng.randrange(7)
    if kind == 0:
        text = text.replace('"format_version": 1', rng.choice(
            ('"format_version": 1.0', '"format_version": true', '"format_version": NaN')))
    elif kind == 1:
        text = text.replace('"payload_bytes": ', '"payload_bytes": Infinity, "x": ', 1)
    elif kind == 2:
        text = '{"format": "netpress", ' + text[1:]  # a duplicate key
    elif kind == 3:
        text = text.replace('"metadata": {', '"metadata": {"n": ' + "9" * 5000 + ", ", 1)
    elif kind == 4:
        depth = rng.choice((100, 5000, 100_000))
        text = text.replace('"metadata": {', '"metadata": {"d": ' + "[" * depth + "]" * depth
                            + ", ", 1)
    elif kind == 5:
        text = text.replace('"shape": [', '"shape": [1e999, ', 1)
    else:
        text = text.replace('"recipe": ', '"recipe": ' + "NaN" if '"recipe": null' in text
                            else '"recipe": null, "r": ', 1)
    sealed = seal(header, parts.raw, head_text=text.encode())
    return sealed


def _graph(header: dict[str, Any]) -> dict[str, Any] | None:
    return header["architecture"].get("graph")  # type: ignore[no-any-return]


def m_names(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Names that shadow what the generated forward uses or collide with nn.Module's own."""
    header = copy.deepcopy(parts.header)
    graph = _graph(header)
    if graph is None:
        return m_header_value(rng, data, parts)
    name = rng.choice(HOSTILE_NAMES)
    kind = rng.randrange(4)
    nodes = graph["nodes"]
    if kind == 0:  # rename a node and every reference to it
        old = rng.choice(nodes)["name"]
        text = json.dumps(graph).replace(json.dumps({"node": old}), json.dumps({"node": name}))
        graph = json.loads(text)
        for n in graph["nodes"]:
            if n["name"] == old:
                n["name"] = name
        header["architecture"]["graph"] = graph
    elif kind == 1:  # a placeholder's argument name
        for n in nodes:
            if n["op"] == "placeholder":
                n["target"] = name
                break
    elif kind == 2 and graph["modules"]:  # a module path, its calls and tensors
        old = rng.choice(sorted(graph["modules"]))
        _rename_module(header, graph, old, name)
        return seal(header, rename_arrays(parts.raw, old, name))
    else:  # a duplicate node name
        if len(nodes) > 2:
            nodes[1]["name"] = nodes[0]["name"]
    return seal(header, parts.raw)


def rename_arrays(raw: bytes, old: str, new: str) -> bytes:
    """The raw payload with array keys under ``old.`` moved under ``new.``."""
    (n,) = struct.unpack("<Q", raw[:8])
    index = json.loads(raw[8:8 + n])
    index = {new + k[len(old):] if k.startswith(old + ".") else k: v for k, v in index.items()}
    head = json.dumps(index).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + raw[8 + n:]


def _rename_module(header: dict[str, Any], graph: dict[str, Any], old: str, new: str) -> None:
    """Rename module ``old`` in the header; the payload needs :func:`rename_arrays` too."""
    graph["modules"][new] = graph["modules"].pop(old)
    for n in graph["nodes"]:
        if n["target"] == old:
            n["target"] = new
    for table in (header["tensors"],):
        for key in [k for k in table if k.startswith(old + ".")]:
            table[new + key[len(old):]] = table.pop(key)
    header["state_dict"] = [new + k[len(old):] if k.startswith(old + ".") else k
                            for k in header["state_dict"]]


def m_spec(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Module specs: kwargs outside the allowlist, huge sizes, unknown types."""
    header = copy.deepcopy(parts.header)
    tables = [header["architecture"]["modules"]]
    if _graph(header):
        tables.append(_graph(header)["modules"])  # type: ignore[index]
    table = rng.choice([t for t in tables if t] or tables)
    if not table:
        return m_header_value(rng, data, parts)
    spec = table[rng.choice(sorted(table))]
    kind = rng.randrange(5)
    if kind == 0:
        spec["kwargs"]["device"] = {"device": "cpu"}
    elif kind == 1:
        spec["kwargs"].update(in_features=30000, out_features=30000, in_channels=30000,
                              out_channels=30000)
        if rng.random() < 0.5:
            spec["kwargs"]["device"] = "cpu"
    elif kind == 2:
        spec["kwargs"][rng.choice(("_weight", "dtype", "factory", "__class__"))] = 1
    elif kind == 3:
        spec["type"] = rng.choice(("os.system", "torch.nn.Module", "builtins.eval",
                                   "torch.nn.Linear", "netpress.QuantLinear", "torch.nn.GELU"))
    else:
        spec["kwargs"] = {k: _hostile_value(rng, header) for k in spec["kwargs"]}
    return seal(header, parts.raw)


def m_tensor(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Tensor table edits: encoding, dtype, shape, arrays, aliases, byte planes."""
    header = copy.deepcopy(parts.header)
    name = rng.choice(sorted(header["tensors"]))
    meta = header["tensors"][name]
    kind = rng.randrange(7)
    if kind == 0:
        meta["encoding"] = rng.choice(("dense", "bitmask", "packed_int", "zstd", ""))
    elif kind == 1:
        meta["dtype"] = rng.choice(("float64", "float16", "int8", "bool", "bfloat16",
                                    "complex64", "object"))
    elif kind == 2:
        meta["shape"] = rng.choice(([2**31, 2**31], [0], [3, -1], [2**40], ["8"], [True]))
    elif kind == 3:
        meta["arrays"] = rng.choice(([], ["values", "values"], ["mask"], [1], ["a/b"]))
    elif kind == 4:
        header["tensors"][name] = {"alias_of": rng.choice((["x"], name, "nope", None,
                                                           sorted(header["tensors"])[0]))}
    elif kind == 5:
        meta["byte_planes"] = rng.choice(({"values": "f8"}, {"values": "O"}, {"nope": "u4"},
                                          []))
    else:
        meta["nnz"] = rng.choice((-1, 2**62, True, "3"))
    return seal(header, parts.raw)


def m_graph(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Structural graph edits: no output, two outputs, use before definition, other ops,
    other allowed or disallowed targets and attributes."""
    header = copy.deepcopy(parts.header)
    graph = _graph(header)
    if graph is None or len(graph["nodes"]) < 3:
        return m_tensor(rng, data, parts)
    nodes = graph["nodes"]
    i = rng.randrange(len(nodes))
    kind = rng.randrange(6)
    if kind == 0:
        nodes.pop()  # the output node
    elif kind == 1:
        nodes.insert(rng.randrange(len(nodes)), copy.deepcopy(nodes[-1]))
    elif kind == 2:
        nodes.insert(0, nodes.pop(i))
    elif kind == 3:
        nodes[i]["op"] = rng.choice(("call_function", "call_method", "call_module",
                                     "get_attr", "placeholder", "exec"))
    elif kind == 4:
        nodes[i]["target"] = rng.choice(("torch.zeros", "torch.nn.functional.relu",
                                         "operator.getitem", "getattr", "view", "__getattr__",
                                         "format", "os.system", "numpy", "stem.weight"))
    else:
        nodes[i]["args"] = rng.choice(([{"node": "nope"}], [{"node": nodes[-1]["name"]}],
                                       [{"x": 1, "y": 2}], [[[[[1]]]]],
                                       [nodes[0]["args"], "__globals__"]))
    return seal(header, parts.raw)


_BOMB_CACHE: dict[tuple[int, bytes], bytes] = {}


def _stream_compress(prefix: bytes, n: int, fill: bytes = b"\0") -> bytes:
    """zstd of ``prefix`` and ``n`` bytes of ``fill``, compressed as a stream (the ``n`` bytes
    are never in memory at once); cached."""
    key = (n, prefix + fill)
    if key not in _BOMB_CACHE:
        c = zstandard.ZstdCompressor(level=3).compressobj(size=len(prefix) + n)
        out, chunk, left = [c.compress(prefix)], fill * (1 << 20), n
        while left:
            out.append(c.compress(chunk[:min(left, len(chunk))]))
            left -= min(left, len(chunk))
        out.append(c.flush())
        _BOMB_CACHE[key] = b"".join(out)
    return _BOMB_CACHE[key]


def m_bomb(rng: random.Random, data: bytes, parts: Parts) -> bytes:
    """Small files that would use gigabytes if the loader trusted them."""
    header = copy.deepcopy(parts.header)
    kind = rng.randrange(6)
    if kind == 0:  # payload_raw_bytes of 1 GiB, and a payload that really expands to it
        header["payload_raw_bytes"] = 1 << 30
        return seal(header, payload=_stream_compress(b"", 1 << 30), digest=False)
    if kind == 1:  # one dense float32 tensor of 1 GiB, consistent all the way down
        return _dense_zero_bomb(header, 1 << 28)
    if kind == 2:  # a header of whitespace that decompresses to 1 GiB
        head = _stream_compress(b"", 1 << 30, b" ")
        return data_prefix() + struct.pack("<Q", len(head)) + head + data[16:]
    if kind == 3:  # a declared header length of 1 TiB
        return data[:8] + struct.pack("<Q", 1 << 40) + data[16:]
    if kind == 4:  # a declared tensor of 2**62 elements
        name = rng.choice(sorted(header["tensors"]))
        if "shape" in header["tensors"][name]:
            header["tensors"][name]["shape"] = [2**31, 2**31]
        return seal(header, parts.raw)
    spec = {"type": "torch.nn.Linear", "kwargs": {"in_features": 30000, "out_features": 30000,
                                                  "device": "cpu"}}
    header["architecture"]["modules"]["bomb"] = spec
    if _graph(header):
        _graph(header)["modules"]["bomb"] = spec  # type: ignore[index]
    return seal(header, parts.raw)


def warm_bombs(header: dict[str, Any]) -> None:
    """Compress the bombs' payloads now (they are cached), e.g. before a memory limit."""
    _stream_compress(b"", 1 << 30)
    _stream_compress(b"", 1 << 30, b" ")
    _dense_zero_bomb(copy.deepcopy(header), 1 << 28)


def _dense_zero_bomb(header: dict[str, Any], numel: int) -> bytes:
    size = numel * 4
    index = {"w/values": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    head = json.dumps(index).encode()
    head += b" " * (-len(head) % 8)
    prefix = struct.pack("<Q", len(head)) + head
    header["tensors"] = {"w": {"dtype": "float32", "shape": [numel], "encoding": "dense",
                               "arrays": ["values"], "byte_planes": {"values": "u4"}}}
    header["state_dict"] = ["w"]
    header["payload_raw_bytes"] = len(prefix) + size
    return seal(header, payload=_stream_compress(prefix, size), digest=False)


Mutator = Callable[[random.Random, bytes, Parts], bytes]
MUTATORS: dict[str, Mutator] = {
    "bitflip": m_bitflip, "bitflip_raw": m_bitflip_raw, "truncate": m_truncate,
    "append": m_append, "header_value": m_header_value, "header_keys": m_header_keys,
    "header_text": m_header_text, "names": m_names, "spec": m_spec, "tensor": m_tensor,
    "graph": m_graph, "bomb": m_bomb,
}
"""Every mutation class, by name."""
