"""Search objectives: latency on eager and ONNX Runtime, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netpress.config import Recipe
from netpress.errors import RecipeError
from netpress.search.objectives import Latency, get_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


@pytest.mark.parametrize("name", ["latency", "latency_onnx"])
def test_latency_objectives_measure_and_rank(name):
    if name == "latency_onnx":
        pytest.importorskip("onnxruntime")
    objective = get_objective(name, threads=1, batch_size=4)
    x = torch.randn(1, 3, 32, 32)
    thin, wide = (objective.measure(_net(w), Recipe([]), x) for w in (8, 192))
    assert math.isfinite(thin) and thin > 0
    assert thin < wide  # ~500x fewer MACs: the ranking survives any timing noise


def test_latency_settings_are_checked():
    with pytest.raises(RecipeError, match="runtime"):
        Latency(runtime="tensorrt")
    with pytest.raises(RecipeError, match="batch_size"):
        Latency(batch_size=0)
    with pytest.raises(RecipeError, match="single-tensor"):
        Latency(runtime="onnx").measure(_net(8), Recipe([]), {"x": torch.randn(1, 3, 8, 8)})
