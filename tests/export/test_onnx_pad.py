"""Constant ``F.pad`` in ONNX (``export/_pad.py``): PyTorch's outputs for every rank and pad
length, negative pads (crops) and a fill value with pads known at export (kept constant),
and pads computed from traced sizes (laid out by the rank read in the graph) at other
lengths than the export's."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.export.onnx import OrtModule


class _Pad(nn.Module):
    def __init__(self, pad: tuple[int, ...], value: float = 0.0) -> None:
        super().__init__()
        self.pad, self.value = pad, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, value=self.value) * 2


@pytest.mark.parametrize("shape,pad", [
    ((3, 5), (1, 2)), ((3, 5), (0, 1, 2, 0)), ((2, 3, 5), (1, 0, 0, 0, 1, 1)),
    ((2, 3, 4, 5), (2, 1)), ((2, 3, 4, 5), (1, -1, -2, 3)), ((1, 2, 3, 4, 5), (1, 1, 1, 1))])
def test_constant_pad_matches_torch(tmp_path, shape, pad):
    model = _Pad(pad, value=-1.5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    path = npr.export_onnx(model, tmp_path / "p.onnx", x)
    assert "Pad" in {n.op_type for n in onnx.load(path).graph.node}
    torch.testing.assert_close(OrtModule(path)(x), model(x))


class _ChunkPad(nn.Module):
    """Pads the sequence of ``ids [batch, seq]``'s embeddings to a multiple of 4, as chunked
    linear attention does (the pad read from the traced length)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).unsqueeze(1)  # [batch, 1, seq, 3]
        extra = (4 - x.shape[2] % 4) % 4
        return F.pad(x, (0, 0, 0, extra)).sum(-1)


def test_pad_from_traced_length_holds_at_other_lengths(tmp_path):
    model = _ChunkPad()
    gen = torch.Generator().manual_seed(1)
    path = npr.export_onnx(model, tmp_path / "c.onnx",
                           {"ids": torch.randint(0, 16, (1, 6), generator=gen)})
    assert "Size" in {n.op_type for n in onnx.load(path).graph.node}  # the rank, read there
    ort = OrtModule(path)
    for batch, seq in ((1, 6), (3, 9), (2, 8)):
        ids = torch.randint(0, 16, (batch, seq), generator=gen)
        out = ort(ids=ids)
        assert out.shape == model(ids).shape
        torch.testing.assert_close(out, model(ids))


def test_other_pad_modes_keep_torchs_form(tmp_path):
    model = nn.ReflectionPad2d((1, 2, 0, 1))
    x = torch.randn(1, 2, 4, 5)
    path = npr.export_onnx(model, tmp_path / "r.onnx", x)
    torch.testing.assert_close(OrtModule(path)(x), model(x))
