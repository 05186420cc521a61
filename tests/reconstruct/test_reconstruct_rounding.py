"""Quantize(rounding="gptq"): the same per-channel grid as round to nearest, codes chosen
with GPTQ's error compensation, so the layer outputs move less on correlated inputs."""

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import DataError, RecipeError


def _data(n: int, seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=torch.Generator().manual_seed(9))
    x = torch.randn(n, 24, generator=g) @ mix  # strongly correlated features
    return [(x[i:i + 64], None) for i in range(0, n, 64)]


def _error(model: nn.Module, ref: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float((model(x) - ref(x)).pow(2).sum()) for x, _ in data)


def test_gptq_rounding_beats_nearest_on_the_same_grid(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib, test = _data(512, 0), _data(256, 1)

    def quantize(rounding: str) -> nn.Module:
        cfg = npr.Quantize(weights=4, activations=None, rounding=rounding,
                           bias_correction=False)
        return npr.compress(model, cfg, calibration=calib, measure=False).model

    gptq, nearest = quantize("gptq"), quantize("nearest")
    pairs = [(a, b) for a, b in zip(gptq.modules(), nearest.modules())
             if hasattr(a, "weight_scale")]
    assert len(pairs) == 2 and npr.compress(
        model, npr.Quantize(weights=4, activations=None, rounding="gptq"), calibration=calib,
        measure=False).report["steps"][-1]["gptq_rounded"] == 2
    for a, b in pairs:  # one grid, other codes
        assert torch.equal(a.weight_scale, b.weight_scale)
        assert not torch.equal(a.weight_q, b.weight_q)
    assert _error(gptq, model, test) < 0.7 * _error(nearest, model, test)
    with pytest.raises(RecipeError, match="rounding"):
        npr.Quantize(rounding="stochastic")
    with pytest.raises(DataError, match="calibration"):
        npr.compress(model, npr.Quantize(activations=None, rounding="gptq"), measure=False)
