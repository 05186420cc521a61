"""Activation-map bytes and sparsity; robustness under noise and FGSM (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.measure.activations import (
    activation_section,
    coded_nbytes,
    fake_quantize_dynamic,
    quantize_codes,
)
from netpress.measure.robustness import fgsm, gaussian_noise, robustness_section
from netpress.quant.primitives import sqnr
from netpress.testing import TinyMLP, toy_batches, varied_teacher


def test_quantize_codes_unsigned_and_signed():
    codes, scale = quantize_codes(torch.tensor([0.0, 0.5, 1.0]), 8)
    assert codes[[0, 2]].tolist() == [0, 255] and int(codes[1]) in (127, 128)
    assert scale == pytest.approx(1 / 255)
    codes, scale = quantize_codes(torch.tensor([-2.0, 0.0, 1.0]), 16)
    assert codes.tolist() == [-32767, 0, 16384]
    with pytest.raises(ValueError):
        quantize_codes(torch.ones(2), 4)


def test_fake_quantize_dynamic_is_accurate():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    assert float(sqnr(x, fake_quantize_dynamic(x, 8))) > 35
    assert float(sqnr(x, fake_quantize_dynamic(x, 16))) > 80


def test_sparse_maps_code_to_fewer_bytes():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(4096, generator=g)
    sparse = torch.where(torch.rand(4096, generator=g) < 0.9, torch.zeros(4096), dense)
    nd = coded_nbytes(quantize_codes(dense, 8)[0], 8)
    ns = coded_nbytes(quantize_codes(sparse, 8)[0], 8)
    assert ns < 0.4 * nd
    assert nd <= 4096 + 16  # never much more than the raw bytes
    assert coded_nbytes(np.zeros(100, dtype=np.int32), 16) < 20


class _ReluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def test_activation_section_counts_zeros_and_bytes():
    torch.manual_seed(0)
    model = _ReluMLP().eval()
    data = toy_batches(model=model)
    sec = activation_section(model, data, reference=model)
    (layer,) = sec["layers"]
    with torch.no_grad():
        acts = torch.cat([model.act(model.fc1(x.flatten(1))) for x, _ in data])
    assert layer["layer"] == "act" and sec["inputs"] == 64
    assert layer["sparsity"] == pytest.approx(float((acts == 0).float().mean()))
    assert layer["float32_bytes"] == 128
    assert 0 < layer["bytes_8bit"] < layer["bytes_16bit"]
    assert sec["agreement"] == 1.0 and sec["agreement_quantized"]["16"] == 1.0


def test_activation_report_section_from_a_recipe():
    torch.manual_seed(0)
    model = _ReluMLP().eval()
    data = toy_batches(model=model)
    res = npr.compress(model, npr.Distill(max_steps=5, lr=1e-2, act_sparsity=0.5), train=data,
                       evaluate=data)
    sec = res.report["activations"]
    assert sec["compressed"]["layers"][0]["layer"] == "act"
    assert "## Activation maps" in res.report.to_markdown()


def test_gaussian_noise_and_fgsm():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1000, 4)
    n = gaussian_noise(x, 0.5, g)
    assert float(n.std()) == pytest.approx(0.5, rel=0.05)
    model = TinyMLP().eval()
    xs, ys = toy_batches(model=model)[0]
    adv = fgsm(model, xs, ys, 0.1)
    assert torch.allclose((adv - xs).abs(), torch.full_like(xs, 0.1), atol=1e-6)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(adv), ys)) > float(loss(model(xs), ys))
    assert all(p.grad is None for p in model.parameters())


def test_robustness_section_side_by_side():
    teacher = varied_teacher()
    data = toy_batches(model=teacher)
    sec = robustness_section(teacher, teacher, data, noise_levels=(0.1, 1.0), fgsm_eps=(0.5,))
    assert sec["clean"]["reference_accuracy"] == 1.0 and sec["clean"]["agreement"] == 1.0
    assert [r["level"] for r in sec["noise"]] == [0.1, 1.0]
    assert sec["noise"][1]["reference_accuracy"] < sec["noise"][0]["reference_accuracy"] <= 1.0
    assert all(r["agreement"] == 1.0 for r in sec["noise"])  # same model, same inputs
    assert sec["fgsm"][0]["compressed_accuracy"] < 1.0
    res = npr.compress(teacher, [npr.GlobalMagnitudePrune(sparsity=0.5),
                                 npr.Distill(max_steps=3, cond_reg=0.1)],
                       train=data, evaluate=data)
    assert res.report["robustness"]["noise"][0]["n"] == 64
    assert "## Robustness" in res.report.to_markdown()


def test_requested_activation_section_without_activation_modules_is_skipped_with_a_reason():
    model = TinyMLP()  # functional ReLU only
    data = toy_batches(model=model)
    res = npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.3), evaluate=data,
                       sections=("activations",))
    assert "no activation module" in res.report["activations"]["skipped"]
    assert "Not measured" in res.report.to_markdown()
    with pytest.raises(npr.RecipeError, match="unknown report section"):
        npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.3), sections=("speed",))
