"""One test per failure class an outside probe found in the artefact loader (issue 12); each
checks the ArtefactError's message."""

from __future__ import annotations

import copy
import os
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

import netpress as npr
from netpress.errors import ArtefactError
from netpress.export import dumps_artefact, load_artefact, model_digest, read_header
from netpress.export._mutations import seal, split
from netpress.testing import TinyCNN, TinyResNet


@pytest.fixture(scope="module")
def good() -> bytes:
    torch.manual_seed(0)
    return dumps_artefact(TinyResNet().eval(), example_inputs=torch.randn(1, 1, 8, 8))


@pytest.fixture(scope="module")
def quantized() -> bytes:
    torch.manual_seed(0)
    result = npr.compress(TinyCNN().eval(), npr.WeightOnly(bits=4), measure=False,
                          example_inputs=torch.randn(1, 1, 8, 8))
    return dumps_artefact(result.model, example_inputs=torch.randn(1, 1, 8, 8))


def _edited(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The artefact with its header edited (sizes, checksums and model digest made to fit)."""
    parts = split(data)
    header = copy.deepcopy(parts.header)
    edit(header)
    return seal(header, parts.raw)


def _nodes(header: dict[str, Any]) -> list[dict[str, Any]]:
    return header["architecture"]["graph"]["nodes"]  # type: ignore[no-any-return]


def _refused(data: bytes, match: str, **kw: Any) -> None:
    with pytest.raises(ArtefactError, match=match):
        load_artefact(data, **kw)


# -- the allowlist could be bypassed at forward() ------------------------------------------------
def test_a_node_named_self_is_refused(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        node = _nodes(h)[1]
        for n in _nodes(h):
            n["args"] = [{"node": "self"} if a == {"node": node["name"]} else a
                         for a in n["args"]]
        node["name"] = "self"
    _refused(_edited(good, edit), r"graph node name 'self' is invalid: it must be a plain "
                                  r"identifier that shadows nothing the generated forward uses")


@pytest.mark.parametrize("name", ["torch", "self", "getattr", "class"])
def test_a_placeholder_shadowing_a_name_of_the_generated_code_is_refused(
        good: bytes, name: str) -> None:
    def edit(h: dict[str, Any]) -> None:
        _nodes(h)[0]["target"] = name
    _refused(_edited(good, edit), rf"placeholder 'x' argument name '{name}' is invalid")


def test_input_as_an_argument_name_still_loads(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        _nodes(h)[0]["target"] = "input"  # nn.Sequential's own argument name
    load_artefact(_edited(good, edit))


@pytest.mark.parametrize("name", ["forward", "training", "_modules", "eval",
                                  "load_state_dict", "graph", "code"])
def test_module_names_colliding_with_nn_module_attributes(good: bytes, name: str) -> None:
    from netpress.export._mutations import _rename_module, rename_arrays

    parts = split(good)
    _rename_module(parts.header, parts.header["architecture"]["graph"], "stem", name)
    _refused(seal(parts.header, rename_arrays(parts.raw, "stem", name)),
             rf"module path '{name}' collides with the nn.Module attribute '{name}'")


# -- memory bombs ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,bad", [({"device": "cpu"}, "device"),
                                        ({"device": {"device": "cpu"}}, "device"),
                                        ({"_weight": None}, "_weight"),
                                        ({"dtype": {"dtype": "float64"}}, "dtype")])
def test_module_spec_kwargs_outside_the_allowlist(good: bytes, kwargs: dict[str, Any],
                                                  bad: str) -> None:
    def edit(h: dict[str, Any]) -> None:
        spec = h["architecture"]["graph"]["modules"]["head"]
        spec["kwargs"].update(kwargs, in_features=30000, out_features=30000)
    _refused(_edited(good, edit), rf"module spec torch.nn.Linear passes kwargs \['{bad}'\], "
                                  r"which are not among its allowed arguments")


def test_a_huge_module_is_built_on_meta_and_refused_by_its_tensors(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:  # allowed kwargs, but 3.6 GB if allocated
        h["architecture"]["graph"]["modules"]["head"]["kwargs"].update(in_features=30000,
                                                                     out_features=30000)
    _refused(_edited(good, edit), r"stored tensors do not fit module 'head'")


def _stream_zeros(n: int, fill: bytes = b"\0") -> bytes:
    from netpress.export._mutations import _stream_compress

    return _stream_compress(b"", n, fill)


def test_payload_raw_bytes_beyond_the_declared_tensors(good: bytes) -> None:
    header = split(good).header
    header["payload_raw_bytes"] = 1 << 30
    bomb = seal(header, payload=_stream_zeros(1 << 30), digest=False)
    assert len(bomb) < 64 << 10
    _refused(bomb, r"payload_raw_bytes 1073741824 exceeds the \d+ bytes its declared tensors "
                   r"can need")


def test_a_whitespace_header_bomb(good: bytes) -> None:
    head = _stream_zeros(1 << 30, b" ")
    bomb = good[:8] + struct.pack("<Q", len(head)) + head
    assert len(bomb) < 64 << 10
    _refused(bomb, r"cannot decompress its header \(the frame declares 1073741824 bytes \(at "
                   r"most 16777216 accepted\)\)")
    _refused(good[:8] + struct.pack("<Q", 1 << 30) + good[16:],
             r"header length 1073741824 is implausible")


def test_declared_tensor_sizes_are_checked_before_allocating(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        h["tensors"]["head.weight"]["shape"] = [2**31, 2**31]
    bomb = _edited(good, edit)
    _refused(bomb, r"its \d+-byte payload would expand to \d{20} bytes, more than "
                   r"max_expansion=1024 times; netpress never writes such files \(a decompression "
                   r"bomb\?\)")
    _refused(bomb, r"tensor 'head.weight': dense array 'values' is uint32 of shape \(64,\), "
                   r"expected uint32 of shape \(4611686018427387904,\)", max_expansion=None)


def test_a_consistent_dense_zero_bomb_is_refused_by_its_expansion(good: bytes) -> None:
    from netpress.export._mutations import _dense_zero_bomb

    bomb = _dense_zero_bomb(split(good).header, 1 << 28)  # a 1 GiB tensor in a 40 KB file
    assert len(bomb) < 64 << 10
    _refused(bomb, r"would expand to 1073741\d+ bytes, more than max_expansion=1024 times")


@pytest.fixture
def alarm() -> Iterator[None]:
    def fail(*_: Any) -> None:
        raise TimeoutError("reading blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_only_regular_files_are_read(tmp_path: Path, alarm: None) -> None:
    fifo = tmp_path / "model.npress"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        for read in (load_artefact, read_header, model_digest):
            with pytest.raises(ArtefactError, match="is not a regular file"):
                read(path)  # type: ignore[operator]
    with pytest.raises(ArtefactError, match="is a folder"):
        load_artefact(tmp_path)


# -- raw exceptions instead of ArtefactError ---------------------------------------------------
def test_size_tags_with_non_integers(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        node = next(n for n in _nodes(h) if n["target"] == "torch.flatten")
        node["args"] = [node["args"][0], {"size": ["a", 1.5]}]
    _refused(_edited(good, edit), r"malformed size value \['a', 1.5\]: sizes are integers")


def test_arrays_of_mixed_types_and_list_aliases(good: bytes) -> None:
    def arrays(h: dict[str, Any]) -> None:
        h["tensors"]["head.weight"]["arrays"] = [1, "values"]
    _refused(_edited(good, arrays), r"header field tensors\['head.weight'\].arrays\[0\] must be "
                                    r"an array name")

    def alias(h: dict[str, Any]) -> None:
        h["tensors"]["head.bias"] = {"alias_of": ["head.weight"]}
    _refused(_edited(good, alias), r"tensors\['head.bias'\].alias_of must be a printable string")


def test_a_changed_encoding(quantized: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        packed = next(m for m in h["tensors"].values() if m.get("encoding") == "packed_int")
        packed["encoding"] = "dense"
    _refused(_edited(quantized, edit), r"dense needs array 'values', which the tensor does not "
                                       r"list")


def _raw_header(data: bytes, text: bytes) -> bytes:
    head = zstandard.ZstdCompressor().compress(text)
    (n,) = struct.unpack("<Q", data[8:16])
    return data[:8] + struct.pack("<Q", len(head)) + head + data[16 + n:]


def _header_text(data: bytes, old: str, new: str) -> bytes:
    import json

    text = json.dumps(split(data).header)
    assert old in text
    return _raw_header(data, text.replace(old, new, 1).encode())


def test_deep_nesting_and_huge_integers(good: bytes) -> None:
    def metadata(value: str) -> bytes:  # the header's metadata is {}: it becomes {"v": value}
        return _header_text(good, '"metadata": {}', f'"metadata": {{"v": {value}}}')

    _refused(metadata("[" * 100_000 + "]" * 100_000),
             "its header nests deeper than JSON parsing allows")
    _refused(metadata("[" * 70 + "]" * 70), "its header nests deeper than 64 levels")
    _refused(metadata("9" * 5000), r"integer 999999999999\.\.\. has 5000 digits; at most 19")
    _refused(metadata("9" * 19), r"integer 9{19} does not fit in 64 bits")
    load_artefact(metadata("[" * 40 + "]" * 40))  # deep, but within bounds


# -- strict JSON -------------------------------------------------------------------------------
@pytest.mark.parametrize("value,match", [
    ("NaN", "NaN is not JSON"), ("Infinity", "Infinity is not JSON"),
    ("1e999", "overflows a float"), ("1.0", "format_version must be an integer, got 1.0"),
    ("true", "format_version must be an integer, got True")])
def test_strict_json(good: bytes, value: str, match: str) -> None:
    _refused(_header_text(good, '"format_version": 1', f'"format_version": {value}'), match)


def test_duplicate_keys(good: bytes) -> None:
    _refused(_header_text(good, '"format": "netpress"', '"format": "netpress", "format": 1'),
             "duplicate key 'format'")


def test_a_graph_without_an_output_node(good: bytes) -> None:
    def edit(h: dict[str, Any]) -> None:
        _nodes(h).pop()
    _refused(_edited(good, edit), r"header field architecture.graph.nodes must end with "
                                  r"exactly one output node")


# -- integrity ---------------------------------------------------------------------------------
def test_an_edited_model_section_is_caught_by_the_digest(good: bytes) -> None:
    parts = split(good)
    parts.header["tensors"]["head.bias"]["shape"] = [2, 2]
    _refused(seal(parts.header, parts.raw, digest=False),
             "its model section does not match its model_digest")
    assert model_digest(good) == read_header(good)["model_digest"]
