"""OWL's non-uniform sparsity allocation and the bias refit after pruning, against
brute-force answers on tiny tensors, and through ``SparseGPT`` on a small model."""

import numpy as np
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.reconstruct.allocation import outlier_ratio, owl_sparsities
from netpress.reconstruct.lstsq import corrected_bias


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.tensor([[1.0, 1.0, 1.0], [1.0, 100.0, 2.0]])  # mean 17.67
    assert outlier_ratio(scores, m=2.0) == pytest.approx(1 / 6)
    assert outlier_ratio(scores, m=10.0) == 0.0
    assert outlier_ratio(torch.ones(4)) == 0.0


def test_owl_gives_outlier_rich_layers_less_sparsity_at_the_same_total():
    ratios, sizes = [0.01, 0.05, 0.03, 0.01], [100, 400, 100, 1000]
    s = owl_sparsities(ratios, sizes, 0.5, lam=0.08)
    total = sum(a * n for a, n in zip(s, sizes)) / sum(sizes)
    assert total == pytest.approx(0.5, abs=1e-12)
    assert s[1] < s[2] < s[0] == pytest.approx(s[3])
    assert s[0] - s[1] == pytest.approx(0.16)  # the range is 2λ
    assert owl_sparsities([0.02, 0.02], [5, 7], 0.6) == pytest.approx([0.6, 0.6])


def test_owl_clips_at_the_bounds_and_keeps_the_total():
    s = owl_sparsities([0.0, 1.0, 1.0], [10, 1, 1], 0.95, lam=0.3, cap=0.99)
    assert max(s) <= 0.99 and min(s) >= 0.0
    total = sum(a * n for a, n in zip(s, [10, 1, 1])) / 12
    assert total == pytest.approx(0.95, abs=1e-9)
    with pytest.raises(ValueError):
        owl_sparsities([0.1], [1, 2], 0.5)


def test_corrected_bias_is_the_least_squares_bias_for_fixed_weights():
    g = torch.Generator().manual_seed(0)
    x_o = torch.randn(200, 5, generator=g, dtype=torch.float64) + 1.0
    x_c = 0.8 * x_o + 0.1 * torch.randn(200, 5, generator=g, dtype=torch.float64) - 0.3
    w, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w_new = w * (torch.rand(3, 5, generator=g, dtype=torch.float64) > 0.5)
    got = corrected_bias(w, w_new, b, x_c.mean(0), x_o.mean(0))
    residual = (x_o @ w.T + b) - x_c @ w_new.T  # the best constant is its mean
    assert torch.allclose(got, residual.mean(0), atol=1e-12)
    err = ((residual - got) ** 2).sum()
    for shift in (1e-3, -1e-3):
        assert err < ((residual - got - shift) ** 2).sum()


def _layer_and_data(seed=0):
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(12, 6))
    x = torch.randn(512, 12) @ torch.randn(12, 12) * 0.5 + 2.0  # correlated, off-centre
    return layer, x, [(x[i:i + 128], None) for i in range(0, 512, 128)]


def _err(model, ref, x):
    with torch.no_grad():
        return float(((model(x) - ref(x)) ** 2).mean())


def test_joint_refit_with_bias_matches_brute_force_least_squares():
    layer, x, calib = _layer_and_data()
    res = npr.compress(layer, npr.SparseGPT(sparsity=0.5, refit=True, refit_bias=True,
                                            damp=1e-7, shrinkage=0),  # exact least squares
                       calibration=calib, measure=False)
    w, keep = res.model[0].weight.detach().double(), res.model[0].weight.detach() != 0
    with torch.no_grad():
        y = layer(x).double()
    xd = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    for r in range(6):
        cols = torch.cat([torch.nonzero(keep[r]).flatten(), torch.tensor([12])])
        sol = np.linalg.lstsq(xd[:, cols].numpy(), y[:, r].numpy(), rcond=None)[0]
        assert np.allclose(w[r, cols[:-1]].numpy(), sol[:-1], atol=1e-3)
        assert float(res.model[0].bias[r].detach()) == pytest.approx(sol[-1], abs=1e-3)


def test_bias_refit_lowers_the_output_error():
    layer, x, calib = _layer_and_data(1)
    errors = {}
    for name, cfg in {"plain": npr.SparseGPT(sparsity=0.6),
                      "bias": npr.SparseGPT(sparsity=0.6, refit_bias=True),
                      "refit": npr.SparseGPT(sparsity=0.6, refit=True),
                      "both": npr.SparseGPT(sparsity=0.6, refit=True, refit_bias=True)}.items():
        errors[name] = _err(npr.compress(layer, cfg, calibration=calib, measure=False).model,
                            layer, x)
    assert errors["bias"] <= errors["plain"] * 1.0001
    assert errors["both"] <= errors["refit"] * 1.0001
    assert errors["both"] < 0.95 * errors["plain"]


def test_owl_allocation_through_sparsegpt_protects_the_outlier_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():  # a few huge weights: outliers of |w|·‖x‖ in the last layer
        model[2].weight[:, :2] *= 40.0
    x = torch.randn(256, 16)
    calib = [(x[i:i + 64], None) for i in range(0, 256, 64)]
    res = npr.compress(model, npr.SparseGPT(sparsity=0.5, allocation="owl"), calibration=calib,
                       measure=False)
    step = res.report["steps"][-1]
    per = step["per_layer_sparsity"]
    assert per["2"] < 0.5 < per["0"]
    assert step["sparsity"] == pytest.approx(0.5, abs=2e-3)
    with pytest.raises(RecipeError, match="owl_lambda"):
        npr.SparseGPT(allocation="owl", owl_lambda=-1.0)
