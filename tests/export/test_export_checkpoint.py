"""The .npress container (netpress.export.checkpoint): save, load, sizes, and every failure."""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import zstandard
from safetensors.torch import load_file, save_file
from torch import nn

from netpress.errors import ArtefactError
from netpress.export import checkpoint as ckpt
from netpress.export import dumps_artefact, load_artefact, read_header, save_artefact


# -- toy models, built only from torch.nn modules and functional ops ---------------------------
class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:  # CIFAR ResNet option A: subsample, zero-pad the channels
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class ToyResNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(Residual(width, width, 1), Residual(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class Chain(nn.Module):
    """conv0 (3->8) -> conv1 (8->16) -> conv2 (16->4): a target for structured pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(F.relu(self.conv0(x))))
        return self.fc(self.conv2(h).mean(dim=(2, 3)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent Python control flow: torch.fx cannot trace it
            h = h * 2
        return self.b(h)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx))


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics (not the defaults), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.3)
    return model.eval()


def _sparse_mlp(sparsity: float = 0.8) -> nn.Module:
    model = _init(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                nn.Linear(256, 10)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)  # -0.0 too
    return model


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


# -- round trips -------------------------------------------------------------------------------
_LOADER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from netpress.export import load_artefact
    outputs = {}
    for i, path in enumerate(sys.argv[2:]):
        loaded = load_artefact(path).model
        assert not loaded.training and type(loaded).__module__.startswith("torch.fx")
        with torch.no_grad():
            outputs[f"y{i}"] = loaded(load_file(path + ".in")["x"]).contiguous()
    assert not [m for m in sys.modules if "test_export" in m or "conftest" in m]
    save_file(outputs, sys.argv[1])
""")


def test_fresh_process_loads_without_user_classes(tmp_path: Path) -> None:
    cases = [(_init(ToyResNet()), _x(2, 3, 8, 8)), (_init(Chain()), _x(2, 3, 5, 5)),
             (_sparse_mlp(), _x(4, 256)), (_init(Tied()), torch.tensor([[1, 2, 3], [4, 5, 49]]))]
    paths, expected = [], []
    for i, (model, x) in enumerate(cases):
        path = tmp_path / f"m{i}.npress"
        save_artefact(path, model, example_inputs=x)
        save_file({"x": x}, f"{path}.in")
        paths.append(str(path))
        with torch.no_grad():
            expected.append(model(x))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(out), *paths], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    for i, y in enumerate(expected):
        assert torch.equal(got[f"y{i}"], y), f"case {i} differs"


def test_loaded_model_properties_and_header() -> None:
    model = _init(ToyResNet())
    data = dumps_artefact(model, recipe={"steps": [{"type": "prune"}]},
                          metadata={"report": {"size": 1}}, example_inputs=_x(1, 3, 8, 8))
    loaded = load_artefact(data)
    assert loaded.recipe == {"steps": [{"type": "prune"}]}
    assert loaded.metadata == {"report": {"size": 1}}
    m = loaded.model
    assert not m.training and all(p.device.type == "cpu" for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())
    assert set(m.state_dict()) == set(model.state_dict())
    arch = loaded.header["architecture"]
    assert arch["verified"] is True and arch["graph_error"] is None
    assert arch["modules"]["layers.1.conv1"]["type"] == "torch.nn.Conv2d"
    assert loaded.header["state_dict"] == list(model.state_dict())


def test_read_header_needs_no_payload(tmp_path: Path) -> None:
    path = tmp_path / "m.npress"
    size = save_artefact(path, _init(Chain()), recipe={"r": 1}, metadata={"k": "v"})
    assert size == path.stat().st_size
    header = read_header(path)
    assert header["recipe"] == {"r": 1} and header["metadata"] == {"k": "v"}
    assert header["payload_codec"] == "zstd" and header["format_version"] == 1
    assert header["netpress_version"]
    with open(path, "rb") as f:
        head = f.read(16 + struct.unpack("<Q", path.read_bytes()[8:16])[0])
    assert read_header(head) == header


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_are_kept(dtype: torch.dtype) -> None:
    model = _sparse_mlp().to(dtype)
    x = _x(3, 256).to(dtype)
    loaded = load_artefact(dumps_artefact(model)).model
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_tied_weights_are_stored_once_and_stay_one_parameter() -> None:
    model = _init(Tied())
    data = dumps_artefact(model)
    loaded = load_artefact(data)
    assert loaded.header["tensors"]["out.weight"] == {"alias_of": "emb.weight", "tied": True}
    count = sum(p.numel() for p in model.parameters())  # 50 * 16: the tie counts once
    for rebuilt in (loaded.model, load_artefact(data, model=Tied()).model):
        assert rebuilt.get_submodule("out").weight is rebuilt.get_submodule("emb").weight
        assert sum(p.numel() for p in rebuilt.parameters()) == count == 800


def test_storage_sharing_without_a_tie_stays_two_parameters() -> None:
    model = _init(Tied())
    model.out.weight = nn.Parameter(model.emb.weight.detach())  # same storage, two Parameters
    loaded = load_artefact(dumps_artefact(model)).model
    assert loaded.get_submodule("out").weight is not loaded.get_submodule("emb").weight
    assert len(list(loaded.parameters())) == 2


def test_eighty_percent_sparse_model_is_small() -> None:
    model = _sparse_mlp(0.8)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = dumps_artefact(model)
    assert len(data) * 4 <= buf.tell(), (len(data), buf.tell())
    encodings = {m.get("encoding") for k, m in read_header(data)["tensors"].items()
                 if k.endswith("weight")}
    assert encodings == {"bitmask"}


def test_model_that_cannot_be_traced(tmp_path: Path) -> None:
    model = _init(DataDependent())
    path = tmp_path / "dd.npress"
    save_artefact(path, model)
    arch = read_header(path)["architecture"]
    assert arch["graph"] is None and "control flow" in arch["graph_error"]
    with pytest.raises(ArtefactError, match=r"holds no graph because .*pass model="):
        load_artefact(path)
    loaded = load_artefact(path, model=DataDependent()).model
    x = _x(5, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(loaded(-x), model(-x))
    assert isinstance(loaded, DataDependent) and not loaded.training


def _prune_channels(model: Chain, keep: int) -> Chain:
    """Simulate structured pruning: conv1 keeps ``keep`` output channels, conv2 follows."""
    pruned = copy.deepcopy(model)
    conv1, conv2 = pruned.conv1, pruned.conv2
    new1, new2 = nn.Conv2d(8, keep, 3, padding=1), nn.Conv2d(keep, 4, 1)
    with torch.no_grad():
        new1.weight.copy_(conv1.weight[:keep])
        new1.bias.copy_(conv1.bias[:keep])
        new2.weight.copy_(conv2.weight[:, :keep])
        new2.bias.copy_(conv2.bias)
    pruned.conv1, pruned.conv2 = new1, new2
    return pruned.eval()


def test_structured_pruning_restored_from_specs_with_template() -> None:
    pruned = _prune_channels(_init(Chain()), keep=12)
    data = dumps_artefact(pruned)
    loaded = load_artefact(data, model=Chain()).model  # the original, unpruned architecture
    assert isinstance(loaded, Chain)
    assert loaded.conv1.out_channels == 12 and loaded.conv2.in_channels == 12
    assert loaded.conv1.weight.shape == (12, 8, 3, 3)
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
        assert torch.equal(load_artefact(data).model(x), pruned(x))  # and from the graph


def test_template_that_does_not_fit() -> None:
    data = dumps_artefact(_init(Chain()))
    with pytest.raises(ArtefactError, match="template ToyResNet has no module"):
        load_artefact(data, model=ToyResNet())
    wrong = Chain()
    wrong.extra = nn.Parameter(torch.zeros(1))  # not in the artefact
    with pytest.raises(ArtefactError, match="do not fit the template Chain.*extra"):
        load_artefact(data, model=wrong)
    loose = load_artefact(data, model=wrong, strict=False).model
    assert torch.equal(loose.extra, torch.zeros(1))


# -- broken files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good() -> bytes:
    return dumps_artefact(_init(ToyResNet()))


def _load_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.npress"
    path.write_bytes(data)
    load_artefact(path)


def _header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[8:16])[0])


def test_truncated_files(tmp_path: Path, good: bytes) -> None:
    head_end = 16 + _header_len(good)
    for cut in (5, 12, 16 + 10, head_end - 1, head_end + 10, len(good) - 1):
        with pytest.raises(ArtefactError, match=r"bad\.npress.*truncated"):
            _load_bytes(tmp_path, good[:cut])


def test_flipped_payload_byte_is_detected(tmp_path: Path, good: bytes) -> None:
    data = bytearray(good)
    data[-100] ^= 0x10
    with pytest.raises(ArtefactError, match="checksum mismatch"):
        _load_bytes(tmp_path, bytes(data))


def test_trailing_garbage(tmp_path: Path, good: bytes) -> None:
    with pytest.raises(ArtefactError, match="unexpected bytes"):
        _load_bytes(tmp_path, good + b"\0")


def test_foreign_files_are_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(_init(Chain()).state_dict(), buf)
    with pytest.raises(ArtefactError, match="zip archive.*torch.save"):
        _load_bytes(tmp_path, buf.getvalue())
    with pytest.raises(ArtefactError, match="not a netpress artefact"):
        _load_bytes(tmp_path, os.urandom(4096))
    with pytest.raises(ArtefactError, match="empty"):
        _load_bytes(tmp_path, b"")
    with pytest.raises(ArtefactError, match="no such file"):
        load_artefact(tmp_path / "missing.npress")
    with pytest.raises(ArtefactError, match="folder"):
        load_artefact(tmp_path)


def test_versions_from_the_future(tmp_path: Path, good: bytes) -> None:
    with pytest.raises(ArtefactError, match="container version 2.*upgrade"):
        _load_bytes(tmp_path, good[:7] + b"\x02" + good[8:])
    with pytest.raises(ArtefactError, match="format version 2.*upgrade"):
        _load_bytes(tmp_path, _edit_header(good, lambda h: h.update(format_version=2)))


def _edit_header(data: bytes, edit: Any) -> bytes:
    n = _header_len(data)
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[16:16 + n]))
    header.pop("model_digest")  # optional: an edit that keeps it is caught by the digest
    edit(header)
    head = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return data[:8] + struct.pack("<Q", len(head)) + head + data[16 + n:]


def test_hand_edited_unknown_function_is_named(tmp_path: Path, good: bytes) -> None:
    def edit(header: dict[str, Any]) -> None:
        for node in header["architecture"]["graph"]["nodes"]:
            if node["target"] == "torch.flatten":
                node["target"] = "os.system"
    with pytest.raises(ArtefactError, match=r"bad\.npress.*node 'flatten' calls 'os\.system'"):
        _load_bytes(tmp_path, _edit_header(good, edit))


def test_inconsistent_tensor_metadata(tmp_path: Path, good: bytes) -> None:
    def edit(header: dict[str, Any]) -> None:
        header["tensors"]["head.weight"]["shape"] = [10, 17]
    with pytest.raises(ArtefactError, match=r"inconsistent.*head\.weight"):
        _load_bytes(tmp_path, _edit_header(good, edit))
    with pytest.raises(ArtefactError, match="cannot decompress its header"):
        _load_bytes(tmp_path, good[:17] + b"\xff" + good[18:])
    with pytest.raises(ArtefactError, match="not valid JSON"):
        _load_bytes(tmp_path, _raw_header(good, b'{"format": "netpress",'))


def _raw_header(data: bytes, text: bytes) -> bytes:
    head = zstandard.ZstdCompressor().compress(text)
    return data[:8] + struct.pack("<Q", len(head)) + head + data[16 + _header_len(data):]


# -- atomic writes -----------------------------------------------------------------------------
def test_failing_save_leaves_existing_file_intact(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.npress"
    path.write_bytes(b"previous")
    with pytest.raises(ArtefactError, match="recipe is not strict JSON"):
        save_artefact(path, _init(Chain()), recipe={"bad": object()})
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.npress"]

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_artefact(path, _init(Chain()))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.npress"]


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError, match="does not exist"):
        save_artefact(tmp_path / "nope" / "m.npress", _init(Chain()))
    assert not (tmp_path / "nope").exists()
