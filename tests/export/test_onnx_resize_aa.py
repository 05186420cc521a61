"""Antialiased ``F.interpolate`` in ONNX (``export/_resize_aa.py``): the same outputs as
PyTorch when shrinking and enlarging, by size or by scale, the refusals that name what to
do, and DINOv2 with registers, whose position embeddings are resized so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError
from netpress.export.onnx import OrtModule


class _Resize(nn.Module):
    def __init__(self, mode: str, size: tuple[int, int] | None = None,
                 scale: float | None = None, align_corners: bool = False) -> None:
        super().__init__()
        self.mode, self.size, self.scale, self.align_corners = mode, size, scale, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, scale_factor=self.scale, mode=self.mode,
                             align_corners=self.align_corners, antialias=True)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(5, 7), (16, 12), (1, 20), (11, 13)])
def test_antialiased_resize_by_size_matches_torch(tmp_path, mode, size):
    model = _Resize(mode, size=size)
    x = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    path = npr.export_onnx(model, tmp_path / "r.onnx", x, opset=18)
    torch.testing.assert_close(OrtModule(path)(x), model(x), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scale", [0.5, 1.75])
def test_antialiased_resize_by_scale_matches_torch(tmp_path, scale):
    model = _Resize("bicubic", scale=scale)
    x = torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(1))
    path = npr.export_onnx(model, tmp_path / "r.onnx", x, opset=18)
    torch.testing.assert_close(OrtModule(path)(x), model(x), rtol=1e-5, atol=2e-5)


def test_refusals_name_the_opset_and_align_corners(tmp_path):
    x = torch.randn(1, 2, 12, 16)
    with pytest.raises(ModelError, match=r"export_onnx\(\.\.\., opset=18\)"):
        npr.export_onnx(_Resize("bicubic", size=(6, 8)), tmp_path / "a.onnx", x, opset=17)
    with pytest.raises(ModelError, match="align_corners=False"):
        npr.export_onnx(_Resize("bilinear", size=(6, 8), align_corners=True),
                        tmp_path / "b.onnx", x, opset=18)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_dinov2_with_registers_exports_at_opset_18(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_register_tokens=2)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    x = torch.randn(2, 3, 48, 40)  # not the configured 32×32: the embeddings are resized
    path = npr.export_onnx(model, tmp_path / "dino.onnx", {"pixel_values": x}, opset=18)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(OrtModule(path)(pixel_values=x), ref, rtol=1e-4, atol=1e-4)
