"""Sensitivity-based sparsity allocation: the maths against brute force on tiny tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

from netpress.reconstruct.sensitivity import relative_saliency, sensitivity_counts


def _cost(scores: list[torch.Tensor], counts: list[int]) -> float:
    return sum(float(s.flatten().sort().values[:k].sum()) for s, k in zip(scores, counts))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) ** p for n, p in ((4, 1.0), (6, 3.0), (5, 0.3))]
    sparsity, shift = 0.5, 0.3
    got = sensitivity_counts(scores, sparsity, shift)
    sizes = [s.numel() for s in scores]
    total = round(sparsity * sum(sizes))
    assert sum(got) == total
    best = min(
        (_cost(scores, list(c)), c) for c in itertools.product(*[range(n + 1) for n in sizes])
        if sum(c) == total and all(n * (sparsity - shift) - 1e-9 <= k <= n * (sparsity + shift)
                                   + 1e-9 for n, k in zip(sizes, c)))
    assert _cost(scores, got) == pytest.approx(best[0], abs=1e-12)
    for n, k in zip(sizes, got):
        assert n * (sparsity - shift) - 1e-9 <= k <= n * (sparsity + shift) + 1e-9


def test_equal_scores_give_uniform_counts_and_zero_shift_is_uniform() -> None:
    s = torch.arange(10.0)
    assert sensitivity_counts([s, s.clone()], 0.5) == [5, 5]
    g = torch.Generator().manual_seed(0)
    assert sensitivity_counts([torch.rand(8, generator=g), torch.rand(8, generator=g)],
                              0.25, max_shift=0.0) == [2, 2]
    with pytest.raises(ValueError):
        sensitivity_counts([], 0.5)


def test_sensitive_layer_gets_less_sparsity() -> None:
    g = torch.Generator().manual_seed(0)
    cheap, dear = torch.rand(100, generator=g), 10 + torch.rand(100, generator=g)
    counts = sensitivity_counts([cheap, dear], 0.5, max_shift=0.2)
    assert counts == [70, 30]


def test_relative_saliency_is_the_obs_cost_of_one_weight() -> None:
    """Zeroing weight q, the rest refitted by least squares: relative output error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    got = relative_saliency(w, h, damp=1e-12)
    energy = float((x @ w.T).pow(2).mean(0).sum())
    for r in range(3):
        for q in range(5):
            keep = [j for j in range(5) if j != q]
            sol = torch.linalg.lstsq(x[:, keep], x @ w[r]).solution
            err = float((x[:, keep] @ sol - x @ w[r]).pow(2).mean())
            assert float(got[r, q]) == pytest.approx(err / energy, rel=1e-6)


def test_sensitivity_allocation_through_sparsegpt_keeps_the_total() -> None:
    import netpress as npr
    from netpress.errors import RecipeError

    torch.manual_seed(0)
    # the first layer reads 4 informative inputs spread over 16 (low-rank inputs): pruning
    # it costs little; the last layer's inputs are all informative
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 16))
    x = torch.randn(256, 4) @ torch.randn(4, 16)
    calib = [(x[i:i + 64], None) for i in range(0, 256, 64)]
    res = npr.compress(model, npr.SparseGPT(sparsity=0.5, allocation="sensitivity",
                                            max_shift=0.3), calibration=calib, measure=False)
    step = res.report["steps"][-1]
    per = step["per_layer_sparsity"]
    assert per["0"] > 0.5 > per["2"]
    assert step["sparsity"] == pytest.approx(0.5, abs=2e-3)
    with pytest.raises(RecipeError, match="max_shift"):
        npr.SparseGPT(allocation="sensitivity", max_shift=1.5)


def test_per_layer_pins_and_the_rest_keep_the_total() -> None:
    import netpress as npr
    from netpress.errors import RecipeError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 16))
    x = torch.randn(256, 16)
    calib = [(x[i:i + 64], None) for i in range(0, 256, 64)]
    cfg = npr.SparseGPT(sparsity=0.5, per_layer={"re:^0$": 0.25})
    assert npr.SparseGPT.from_dict(cfg.to_dict()) == cfg
    step = npr.compress(model, cfg, calibration=calib, measure=False).report["steps"][-1]
    assert step["per_layer_sparsity"]["0"] == pytest.approx(0.25, abs=1e-3)
    assert step["per_layer_sparsity"]["2"] == pytest.approx(0.75, abs=1e-3)
    assert step["sparsity"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(RecipeError, match="leave"):
        npr.compress(model, npr.SparseGPT(sparsity=0.6, per_layer={"0": 0.0}),
                     calibration=calib, measure=False)
    with pytest.raises(RecipeError, match="per_layer"):
        npr.SparseGPT(per_layer={"0": 0.3}, allocation="owl")
