"""``F.fold`` in ONNX (``export/_col2im.py``): an ``output_size`` read from traced sizes
(MobileViT-V2 folds its patches back to the feature map's own size), padding that differs
between height and width, and MobileViT-V2 itself, at opset 18 (``Col2Im``'s)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError
from netpress.export.onnx import OrtModule


class _UnfoldFold(nn.Module):
    def __init__(self, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], traced: bool) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding, self.traced = kernel, stride, padding, traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3]) if self.traced else (8, 10)
        cols = F.unfold(x, self.kernel, stride=self.stride, padding=self.padding)
        return F.fold(cols * 2, size, self.kernel, stride=self.stride, padding=self.padding)


@pytest.mark.parametrize("kernel,stride,padding", [
    ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 0)), ((3, 3), (2, 1), (0, 1))])
@pytest.mark.parametrize("traced", [True, False])
def test_fold_matches_torch(tmp_path, kernel, stride, padding, traced):
    model = _UnfoldFold(kernel, stride, padding, traced)
    x = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    path = npr.export_onnx(model, tmp_path / "f.onnx", x, opset=18)
    torch.testing.assert_close(OrtModule(path)(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_below_opset_18_is_refused_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"opset=18"):
        npr.export_onnx(_UnfoldFold((2, 2), (2, 2), (0, 0), True), tmp_path / "f.onnx",
                        torch.randn(1, 3, 8, 10))


def test_mobilevitv2_exports_at_opset_18(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MobileViTV2Config(image_size=64, num_labels=5, width_multiplier=0.25)
    torch.manual_seed(0)
    model = transformers.MobileViTV2ForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    path = npr.export_onnx(model, tmp_path / "mvit.onnx", {"pixel_values": x}, opset=18)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    torch.testing.assert_close(OrtModule(path)(pixel_values=x), ref, rtol=1e-4, atol=1e-4)


def test_the_first_export_of_a_process_leaves_torchs_own_forms_registered(tmp_path):
    """torch fills its registry during its first export; netpress's snapshot taken before
    it used to delete torch's own ``col2im`` on leaving, so opset 17 was then refused
    without naming opset 18 (a fresh process: the first export must be netpress's)."""
    import subprocess
    import sys

    code = f"""
import torch, netpress as npr
from torch import nn
from netpress.errors import ModelError
fold = nn.Sequential(nn.Fold(output_size=(4, 4), kernel_size=2, stride=2))
x = torch.randn(1, 12, 4)
npr.export_onnx(fold, {str(tmp_path / 'a.onnx')!r}, x, opset=18)
try:
    npr.export_onnx(fold, {str(tmp_path / 'b.onnx')!r}, x, opset=17)
except ModelError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "opset=18" in out.stdout, out.stdout + out.stderr[-2000:]
