"""Lossless 8-bit inputs: lattice detection on tiny tensors, and the first-layer rewrite."""

import numpy as np
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.export import dumps_artefact, load_artefact
from netpress.quant import Quantize
from netpress.quant.input_grid import InputLattice, detect_lattice
from netpress.quant.primitives import sqnr

MEAN, STD = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])


def _pixels(n=64, size=8, lo=0, hi=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(lo, hi, (n, 3, size, size), generator=g).float()
    return ((p / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).float(), p


def test_lattice_of_normalized_pixels_is_found_exactly():
    x, p = _pixels()
    offset, step = detect_lattice(x)
    torch.testing.assert_close(step, (1 / (255 * STD)).float(), rtol=1e-5, atol=0)
    k = (x.double() - offset.double().reshape(1, 3, 1, 1)) / step.double().reshape(1, 3, 1, 1)
    assert float((k - k.round()).abs().max()) < 1e-3
    assert torch.equal(k.round(), p.double())  # the integers are the pixels themselves


def test_a_partial_range_is_centred_and_non_lattices_are_refused():
    x, p = _pixels(lo=100, hi=201)  # 101 levels: centred in 0..255
    offset, step = detect_lattice(x)
    k = ((x.double() - offset.double().reshape(1, 3, 1, 1))
         / step.double().reshape(1, 3, 1, 1)).round()
    assert int(k.min()) == 77 and int(k.max()) == 177
    assert detect_lattice(torch.randn(8, 3, 4, 4)) is None
    wide = torch.arange(300.0).reshape(1, 1, 300) * 0.01  # 300 levels: no 8-bit lattice
    assert detect_lattice(wide) is None
    assert detect_lattice(torch.zeros(4, 3)) is None  # one value: no step


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_quantize_rewrites_the_first_conv_and_quantizes_pixels_exactly():
    torch.manual_seed(0)
    model = _Net().eval()
    x, p = _pixels(128)
    data = [(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 128, 32)]
    grid = npr.compress(model, Quantize(), calibration=data, measure=False).model
    plain = npr.compress(model, Quantize(input_grid=False), calibration=data,
                         measure=False).model
    assert isinstance(grid.input_lattice, InputLattice) and grid.conv1.padding == (0, 0)
    assert not hasattr(plain, "input_lattice")
    with torch.no_grad():
        mapped = grid.input_lattice(x)
        inner = mapped[:, :, 1:-1, 1:-1]  # the padded border maps the zeros
        assert torch.allclose(inner, p, atol=1e-3)  # the input codes are the pixels
        ref = model(x)
        assert sqnr(ref, grid(x)) > sqnr(ref, plain(x))
    loaded = load_artefact(dumps_artefact(grid)).model  # the rewrite saves and loads
    with torch.no_grad():
        assert torch.equal(loaded(x), grid(x))


@pytest.mark.parametrize("inputs", ["continuous", "linear"])
def test_no_rewrite_without_a_lattice_or_a_first_conv(inputs):
    torch.manual_seed(0)
    if inputs == "continuous":
        model, x = _Net().eval(), torch.randn(64, 3, 8, 8)
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4)).eval()
        x = _pixels(64)[0]
    data = [(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 64, 32)]
    q = npr.compress(model, Quantize(), calibration=data, measure=False).model
    assert not any(isinstance(m, InputLattice) for m in q.modules())


def test_onnx_runtime_runs_the_rewritten_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from netpress.export.onnx import export_onnx, optimized_op_types, ort_run, ort_session

    torch.manual_seed(0)
    model = _Net().eval()
    x, _ = _pixels(64)
    data = [(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 64, 32)]
    q = npr.compress(model, Quantize(), calibration=data, measure=False).model
    path = export_onnx(q, tmp_path / "g.onnx", x[:1])
    assert optimized_op_types(path).count("QLinearConv") == 2
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(ort_session(path), x), q(x).numpy(), atol=1e-3)


def test_qat_keeps_the_lossless_input_grid():
    """QAT learns every activation scale but the pixel-index quantizer's (scale 1, zp 0)."""
    from netpress.quant.input_grid import lattice_quantizers
    from netpress.quant.qat import QAT

    torch.manual_seed(0)
    model = _Net().eval()
    x, p = _pixels(128)
    data = [(x[i:i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 128, 32)]
    q = npr.compress(model, QAT(max_steps=8, lr=1e-2, alpha=1.0), calibration=data,
                     train=data, measure=False).model
    (name,) = lattice_quantizers(q)
    aq = q.get_submodule(name)
    assert float(aq.scale) == 1.0 and int(aq.zero_point) == 0
    before = npr.compress(model, Quantize(), calibration=data, measure=False).model
    others = [n for n, m in q.named_modules() if type(m).__name__ == "ActQuant" and n != name]
    assert others and any(float(q.get_submodule(n).scale)
                          != float(before.get_submodule(n).scale) for n in others)
    with torch.no_grad():  # the input still reaches the first conv as the pixels themselves
        assert torch.allclose(aq(q.input_lattice(x))[:, :, 1:-1, 1:-1], p, atol=1e-3)
