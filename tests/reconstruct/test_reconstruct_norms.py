"""LayerNorm re-fit: the per-channel closed form against brute-force least squares, and the
re-fit of a perturbed model's LayerNorms against the original's outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from netpress.reconstruct.norms import NormStats, affine_fit, refit_layer_norms


def test_affine_fit_matches_per_channel_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = 1.7 * u + 0.3 + 0.2 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    stats = NormStats(4)
    stats.add(u[:100], y[:100])
    stats.add(u[100:], y[100:])
    gamma, beta = affine_fit(stats, torch.ones(4, dtype=torch.float64),
                             torch.zeros(4, dtype=torch.float64), ridge=0.0)
    for c in range(4):
        slope, intercept = np.polyfit(u[:, c].numpy(), y[:, c].numpy(), 1)
        assert float(gamma[c]) == pytest.approx(slope, rel=1e-9)
        assert float(beta[c]) == pytest.approx(intercept, rel=1e-9, abs=1e-12)


def test_constant_channel_keeps_gamma_and_matches_the_mean() -> None:
    u = torch.zeros(10, 2, dtype=torch.float64)
    u[:, 1] = torch.linspace(-1, 1, 10)
    y = torch.stack([torch.full((10,), 2.0), 3 * u[:, 1]], 1).double()
    stats = NormStats(2)
    stats.add(u, y)
    gamma, beta = affine_fit(stats, torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0]))
    assert float(gamma[0]) == 0.5 and float(beta[0]) == pytest.approx(2.0)
    assert float(gamma[1]) == pytest.approx(3.0, rel=1e-5)


def test_refit_brings_the_outputs_back_towards_the_original() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16),
                        nn.LayerNorm(16)).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():  # "pruning": drop the smallest half of each Linear's weights
        for i in (0, 3):
            w = model[i].weight
            w.masked_fill_(w.abs() < w.abs().median(), 0.0)
    x = torch.randn(512, 8) * torch.linspace(0.2, 3, 8)
    calib = [(x[i:i + 128], None) for i in range(0, 512, 128)]
    with torch.no_grad():
        before = float((model(x) - ref(x)).pow(2).mean())
    names = refit_layer_norms(model, ref, calib)
    with torch.no_grad():
        after = float((model(x) - ref(x)).pow(2).mean())
    assert names == ["1", "4"]
    assert after < 0.8 * before
    assert torch.equal(model[0].weight, model[0].weight)  # only the norms changed
    assert not torch.equal(model[4].weight, ref[4].weight)


def test_sparsegpt_refit_norms_option() -> None:
    import netpress as npr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(256, 16)
    calib = [(x[i:i + 64], None) for i in range(0, 256, 64)]
    res = npr.compress(model, npr.SparseGPT(sparsity=0.7, refit_norms=True),
                       calibration=calib, measure=False)
    plain = npr.compress(model, npr.SparseGPT(sparsity=0.7), calibration=calib, measure=False)
    assert res.report["steps"][-1]["norms_refit"] == 1
    with torch.no_grad():
        err = {k: float((r.model(x) - model(x)).pow(2).mean()) for k, r in
               (("norms", res), ("plain", plain))}
    assert err["norms"] < err["plain"]  # measured 0.9870x on this toy
    assert torch.equal(res.model[0].weight == 0, plain.model[0].weight == 0)
