"""Per-layer sensitivity: one layer quantized at a time, model restored afterwards."""

import pytest
import torch

from netpress.errors import SelectionError
from netpress.quant.sensitivity import layer_sensitivity
from netpress.testing import TinyCNN, toy_batches


def test_sensitivity_finds_the_robust_layer():
    torch.manual_seed(0)
    model = TinyCNN(width=16).eval()
    with torch.no_grad():  # +-0.5 weights are exact on a 2-bit per-channel grid
        model.fc.weight.copy_(torch.sign(model.fc.weight) * 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = toy_batches(128, 32, model=model)
    result = layer_sensitivity(model, data, bits=2, weight_observer="minmax")
    assert list(result) == ["conv1", "conv2", "fc"]
    assert all(0.0 <= r["agreement"] <= 1.0 for r in result.values())
    assert result["fc"] == {"agreement": 1.0, "sqnr_db": float("inf")}
    assert result["conv1"]["sqnr_db"] < 20 and result["conv2"]["sqnr_db"] < 20
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    eight = layer_sensitivity(model, data, bits=8, layers=("re:conv.*",), ignore=("conv1",))
    assert list(eight) == ["conv2"]
    assert eight["conv2"]["sqnr_db"] > result["conv2"]["sqnr_db"] + 20


def test_unknown_layer_pattern_is_an_error():
    with pytest.raises(SelectionError):
        layer_sensitivity(TinyCNN().eval(), toy_batches(16, 8), layers=("nope",))
