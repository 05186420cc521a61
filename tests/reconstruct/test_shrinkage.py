"""Shrinkage of the input Hessian toward its diagonal (netpress.reconstruct.shrinkage)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.reconstruct.gptq import gptq_quantize, rtn_quantize
from netpress.reconstruct.lstsq import refit_target
from netpress.reconstruct.shrinkage import Shrinker, shrink_, shrinkage_intensity, shrunk
from netpress.reconstruct.sparsegpt import sparsegpt, wanda_mask
from netpress.reconstruct.stats import LayerStats


def _spd(d: int, seed: int) -> torch.Tensor:
    """A correlated population second-moment matrix: a few strong shared factors plus
    independent noise, with unequal input scales."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(d, 4, generator=g, dtype=torch.float64)
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.2
    return scale[:, None] * (f @ f.T + torch.eye(d, dtype=torch.float64)) * scale[None, :]


def _rows(sigma: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sigma.shape[0], generator=g, dtype=torch.float64)
    return z @ torch.linalg.cholesky(sigma).T


def test_shrink_scales_off_diagonal_keeps_diagonal() -> None:
    h = _spd(6, 0)
    for a in (0.0, 0.3, 1.0):
        got = shrunk(h, a)
        want = (1 - a) * h + a * torch.diag(torch.diagonal(h))
        assert torch.allclose(got, want, atol=1e-12)
    batch = torch.stack([h, 2 * h])
    shrink_(batch, 0.5)
    assert torch.allclose(batch[1], 2 * shrunk(h, 0.5), atol=1e-12)


def test_intensity_matches_the_oracle_by_monte_carlo() -> None:
    """The closed form vs the oracle ``Σ Var(r_ij) / Σ E[r_ij²]`` over 400 draws of ``n``
    Gaussian rows (the quantity the estimator targets), at three row counts."""
    d = 12
    sigma = _spd(d, 1)
    off = ~torch.eye(d, dtype=torch.bool)
    for n in (8, 24, 96):
        rs, est = [], []
        for s in range(400):
            x = _rows(sigma, n, 100 + s)
            h = x.T @ x / n
            inv = torch.diagonal(h).rsqrt()
            rs.append((h * inv[:, None] * inv[None, :])[off])
            est.append(shrinkage_intensity(h, n))
        r = torch.stack(rs)
        oracle = float(r.var(0).sum() / r.pow(2).mean(0).sum())
        mean_est = sum(est) / len(est)
        assert abs(mean_est - oracle) < 0.35 * oracle + 0.01, (n, mean_est, oracle)


def test_intensity_falls_as_one_over_n_and_is_one_for_white_inputs() -> None:
    sigma = _spd(16, 2)
    a = [shrinkage_intensity(_rows(sigma, n, 3).T @ _rows(sigma, n, 3) / n, n)
         for n in (64, 256, 1024)]
    assert a[0] > a[1] > a[2]
    assert 2.5 < a[0] / a[1] < 6 and 2.5 < a[1] / a[2] < 6  # ~4x per 4x the rows
    white = _rows(torch.eye(16, dtype=torch.float64), 8, 4)
    # (the oracle is 1 there; the plug-in r² of 8 rows is biased low: 0.64 at this draw)
    assert shrinkage_intensity(white.T @ white / 8, 8) > 0.5
    assert shrinkage_intensity(torch.eye(1, dtype=torch.float64), 3) == 0.0


def test_full_shrinkage_is_wanda_and_round_to_nearest() -> None:
    """α = 1: SparseGPT updates no weight and prunes those of least ``w² · (H_qq + λ)``
    (Wanda's score squared, damped; chosen over the layer's block rather than per row);
    GPTQ gives the codes of round to nearest."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    h = shrunk(_spd(32, 5), 1.0)
    pruned, keep = sparsegpt(w, h, sparsity=0.5)
    assert torch.equal(pruned, torch.where(keep, w, torch.zeros_like(w)))
    diag = torch.diagonal(h)
    score = w ** 2 * (diag + 0.01 * diag.mean())
    assert torch.equal(~keep.flatten(), score.flatten() <= score.flatten().kthvalue(128).values)
    assert (keep == wanda_mask(w, diag, sparsity=0.5)).double().mean() > 0.85
    q = gptq_quantize(w, h, 4, group_size=16)
    assert torch.equal(q.codes, rtn_quantize(w, 4, group_size=16).codes)


def _heldout(w: torch.Tensor, new: torch.Tensor, sigma: torch.Tensor) -> float:
    dw = new - w
    return float(torch.einsum("rd,de,re->", dw, sigma, dw)
                 / torch.einsum("rd,de,re->", w, sigma, w))


def test_shrinkage_lowers_heldout_error_when_rows_are_fewer_than_columns() -> None:
    """48 calibration rows for 64 inputs (rank-deficient H): the population error of
    SparseGPT 50% with the estimated shrinkage is well below the plain fit's, and within
    10% of the best intensity on a grid; with 4,096 rows the estimate is small and the
    fit as good as the plain one."""
    d = 64
    sigma = _spd(d, 6)
    w = torch.randn(32, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for n, low in ((48, True), (4096, False)):
        x = _rows(sigma, n, 8)
        h = x.T @ x / n
        alpha = shrinkage_intensity(h, n)
        plain = _heldout(w, sparsegpt(w, h, sparsity=0.5)[0], sigma)
        shrink = _heldout(w, sparsegpt(w, shrunk(h, alpha), sparsity=0.5)[0], sigma)
        if low:
            grid = min(_heldout(w, sparsegpt(w, shrunk(h, a), sparsity=0.5)[0], sigma)
                       for a in torch.linspace(0, 1, 21).tolist())
            assert shrink < 0.8 * plain, (shrink, plain)
            assert shrink < 1.1 * grid, (shrink, grid)
        else:
            assert alpha < 0.05
            assert shrink < 1.05 * plain, (shrink, plain)  # mask-choice jitter ~3%


def test_intensity_in_row_blocks_matches_the_whole_matrix_formula() -> None:
    d = 300  # more than one block of rows
    x = _rows(_spd(d, 9), 200, 10)
    h = x.T @ x / 200
    inv = torch.diagonal(h).rsqrt()
    r2 = (h * inv[:, None] * inv[None, :]).pow(2)
    off = ~torch.eye(d, dtype=torch.bool)
    want = float((1 - r2[off]).pow(2).sum() / (200 * r2[off].sum()))
    assert abs(shrinkage_intensity(h, 200) - want) < 1e-9 * max(want, 1)


def _mlp(d: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    return model, torch.linalg.cholesky(_spd(d, seed).float())


def _heldout_mse(model: nn.Module, out: nn.Module, chol: torch.Tensor) -> float:
    x = torch.randn(4096, chol.shape[0], generator=torch.Generator().manual_seed(99)) @ chol.T
    with torch.no_grad():
        ref = model(x)
        return float((out(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("method", ["sparsegpt", "gptq"])
def test_auto_shrinkage_fits_few_rows_better_and_leaves_many_alone(method: str) -> None:
    """A two-layer MLP on 64 correlated inputs. With 40 calibration rows (fewer than the
    inputs), the held-out output error with ``shrinkage="auto"`` is clearly below the
    unshrunk fit's; with 4,096 rows the shrinkage is tiny and the error within noise."""
    model, chol = _mlp(64, 11)
    make = (lambda s: npr.SparseGPT(sparsity=0.5, shrinkage=s)) if method == "sparsegpt" \
        else (lambda s: npr.GPTQ(bits=3, group_size=None, shrinkage=s))
    for n, few in ((40, True), (4096, False)):
        x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) @ chol.T
        calib = [(x[i:i + 512], None) for i in range(0, n, 512)]
        errs, reports = {}, {}
        for s in ("auto", 0):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = npr.compress(model, [make(s)], calibration=calib, measure=False)
            errs[s] = _heldout_mse(model, res.model, chol)
            reports[s] = res.report["steps"][-1]
            assert any("fewer calibration rows than inputs" in str(w.message)
                       for w in caught) == few
        alpha = reports["auto"]["shrinkage"]["0"]
        assert reports[0]["shrinkage"] == {"0": 0.0, "2": 0.0}
        if few:
            assert reports["auto"]["min_rows_per_column"] == round(40 / 64, 3)
            assert alpha > 0.1
            assert errs["auto"] < 0.85 * errs[0], errs
        else:
            assert alpha < 0.02
            assert errs["auto"] < 1.05 * errs[0], errs


def test_shrinkage_setting_is_checked_and_saved() -> None:
    for bad in (-0.1, 1.5, "yes", True, float("nan")):
        with pytest.raises(RecipeError, match="shrinkage"):
            npr.SparseGPT(sparsity=0.5, shrinkage=bad)
    cfg = npr.GPTQ(bits=4, shrinkage=0.25)
    assert npr.GPTQ.from_dict(cfg.to_dict()) == cfg
    assert npr.SparseGPT(sparsity=0.5).shrinkage == "auto"


def test_shrinker_keeps_the_cross_difference_and_reports_each_layer() -> None:
    """The cross term M becomes M - α·offdiag(H): M - H (what a refit to the original
    outputs reads) is unchanged, so unchanged inputs (M = H) still refit to W itself."""
    x = _rows(_spd(10, 12), 6, 13)
    h = (x.T @ x / 6)[None]
    m = h + 0.01 * torch.randn(1, 10, 10, generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    stats = LayerStats(h.clone(), torch.diagonal(h, dim1=1, dim2=2).clone(), m.clone(), 6)
    shrinker = Shrinker("auto")
    shrinker(["a", "b"], stats)
    alpha = shrinkage_intensity(h[0], 6)
    assert alpha > 0.2
    assert torch.allclose(stats.hessian, shrunk(h, alpha), atol=1e-12)
    assert torch.allclose(stats.cross - stats.hessian, m - h, atol=1e-12)
    assert shrinker.summary() == {"shrinkage": {"a": round(alpha, 4), "b": round(alpha, 4)},
                                  "min_rows_per_column": 0.6}
    w = torch.randn(3, 10, dtype=torch.float64)
    same = LayerStats(h.clone(), torch.diagonal(h, dim1=1, dim2=2).clone(), h.clone(), 6)
    Shrinker(0.5)(["c"], same)
    assert same.hessian is not None and same.cross is not None
    assert torch.allclose(refit_target(w, same.hessian[0], same.cross[0], 0.01), w,
                          atol=1e-10)


def test_refit_norms_segments_report_every_layer_shrinkage() -> None:
    """SparseGPT with ``refit_norms`` fits segment by segment: the report still holds the
    shrinkage of every layer and the fewest rows per input over all of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    x = torch.randn(24, 32)
    res = npr.compress(model, [npr.SparseGPT(sparsity=0.5, refit_norms=True)],
                       calibration=[(x, None)], measure=False)
    step = res.report["steps"][-1]
    assert set(step["shrinkage"]) == {"0", "2"}
    assert all(0 < a <= 1 for a in step["shrinkage"].values())
    assert step["min_rows_per_column"] == 0.75
