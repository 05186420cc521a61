"""The stored forward graph (netpress.export.graph): trace, JSON, rebuild, allowlists."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import ArtefactError, ModelError
from netpress.export.graph import FUNCTIONS, graph_from_json, graph_tensors, graph_to_json, trace


class Block(nn.Module):
    """A user container: flattened into the graph."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.gate = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) * self.gate + x)


class Everything(nn.Module):
    """Many graph constructs at once."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.register_buffer("offset", torch.linspace(-1, 1, 16))
        self.register_buffer("scratch", torch.ones(16), persistent=False)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> dict[str, Any]:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        h = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))  # option-A shortcut: 16 channels
        n, c = h.shape[0], h.size(1)
        seq = h.flatten(2).transpose(1, 2).contiguous()  # (n, hw, c)
        a, b = torch.chunk(seq, 2, dim=1)
        seq = torch.cat([b, a], dim=1) + self.offset * self.scratch
        length = seq.shape[1]
        mask = torch.triu(seq.new_ones((length, length)), diagonal=1).bool()
        scores = F.scaled_dot_product_attention(seq, seq, seq, attn_mask=~mask)
        att, _ = self.attn(seq, seq, seq, need_weights=False)
        out = self.norm(att + scores).masked_fill(seq < -10, -math.inf)
        pooled = out[..., :c].mean(dim=1) * scale
        return {"logits": F.softmax(pooled.view(n, -1), dim=-1), "aux": (out[:, 0], h)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _roundtrip(model: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    gm = trace(model)
    d = json.loads(json.dumps(graph_to_json(gm), allow_nan=False))
    tensors = {k: v.clone() for k, v in graph_tensors(gm).items()}
    return d, graph_from_json(d, tensors)


def test_everything_round_trips_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = Everything().eval()
    d, rebuilt = _roundtrip(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _same(rebuilt(x), model(x))
        assert _same(rebuilt(x, 3.0), model(x, 3.0))
    ops = {n["op"] for n in d["nodes"]}
    assert ops == {"placeholder", "get_attr", "call_function", "call_method", "call_module",
                   "output"}
    assert "blocks.0.conv" in d["modules"] and "blocks.0" not in d["modules"]
    assert d["modules"]["attn"]["type"] == "torch.nn.MultiheadAttention"
    assert d["attrs"]["scratch"] == {"kind": "buffer", "persistent": False}
    assert d["attrs"]["blocks.0.gate"]["kind"] == "parameter"
    assert not rebuilt.training
    assert isinstance(rebuilt.get_parameter("blocks.0.gate"), nn.Parameter)


def test_function_targets_use_canonical_names() -> None:
    d, _ = _roundtrip(Everything().eval())
    targets = {n["target"] for n in d["nodes"] if n["op"] == "call_function"}
    assert {"operator.add", "operator.getitem", "torch.nn.functional.pad", "torch.cat",
            "getattr"} <= targets
    assert targets <= set(FUNCTIONS)


def test_hooks_on_standard_modules_are_kept() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    model[0].register_forward_hook(lambda mod, args, out: out * 3)
    model[1].register_forward_pre_hook(lambda mod, args: (args[0] - 1,))
    d, rebuilt = _roundtrip(model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert _same(rebuilt(x), model(x))
    assert "0" not in d["modules"]  # traced through, so the hook is in the graph


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), DataDependent())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def test_trace_failure_names_the_module() -> None:
    with pytest.raises(ModelError, match=r"inner\.1' \(DataDependent\).*control flow"):
        trace(Branchy())


class UsesNumpy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfcx(x)


def test_function_outside_allowlist_is_refused_at_save() -> None:
    with pytest.raises(ModelError, match="erfcx"):
        graph_to_json(trace(UsesNumpy()))


def _edit(d: dict[str, Any], node_name: str, **changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    for node in d["nodes"]:
        if node["name"] == node_name:
            node.update(changes)
    return d


def _small() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    gm = trace(model)
    return graph_to_json(gm), graph_tensors(gm)


@pytest.mark.parametrize("edit,match", [
    ({"op": "call_function", "target": "os.system"}, "os.system"),
    ({"op": "call_function", "target": "builtins.eval"}, "builtins.eval"),
    ({"op": "call_method", "target": "numpy"}, "numpy"),
    ({"op": "call_method", "target": "__reduce_ex__"}, "__reduce_ex__"),
    ({"op": "get_attr", "target": "__class__"}, "__class__"),
    ({"op": "call_module", "target": "0; import os"}, "dotted path"),
    ({"op": "call_module", "target": "nope"}, "nope"),
    ({"name": "x = __import__('os')"}, "invalid"),
    ({"op": "exec"}, "malformed"),
])
def test_hostile_or_broken_nodes_are_refused(edit: dict[str, Any], match: str) -> None:
    d, tensors = _small()
    with pytest.raises(ArtefactError, match=match):
        graph_from_json(_edit(d, "_1", **edit), tensors)


def test_unknown_function_error_names_target_and_node() -> None:
    d, tensors = _small()
    d = _edit(d, "_1", op="call_function", target="subprocess.run")
    with pytest.raises(ArtefactError, match=r"node '_1' calls 'subprocess\.run'"):
        graph_from_json(d, tensors)


def test_code_injection_through_names_is_refused() -> None:
    d, tensors = _small()
    placeholder = d["nodes"][0]["name"]
    evil = "x=__import__('os').system('echo hacked')"
    with pytest.raises(ArtefactError, match="argument name"):
        graph_from_json(_edit(d, placeholder, target=evil), tensors)
    bad_kwargs = _edit(d, "_1", kwargs={"inplace=__import__('os')": False})
    with pytest.raises(ArtefactError, match="kwargs"):
        graph_from_json(bad_kwargs, tensors)
    getattr_node = {"op": "call_function", "name": "g", "target": "getattr",
                    "args": [{"node": placeholder}, "__class__"], "kwargs": {}}
    d2 = copy.deepcopy(d)
    d2["nodes"].insert(1, getattr_node)
    with pytest.raises(ArtefactError, match="attribute"):
        graph_from_json(d2, tensors)


def test_missing_tensors_and_bad_references() -> None:
    d, tensors = _small()
    with pytest.raises(ArtefactError, match="lacks"):
        graph_from_json(d, {k: v for k, v in tensors.items() if k != "0.bias"})
    with pytest.raises(ArtefactError, match="reference"):
        graph_from_json(_edit(d, "_1", args=[{"node": "later"}]), tensors)
    with pytest.raises(ArtefactError, match="version"):
        graph_from_json({**d, "version": 99}, tensors)
