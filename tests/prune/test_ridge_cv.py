"""The refit's ridge chosen by cross-validation (``netpress.prune.ridge_cv``): the held-out
errors against a brute-force fit on the rows themselves, the choice on planted problems."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from netpress.prune.ridge_cv import DAMP_GRID, FoldSums, cv_damp, ridge_path_errors


def _problem(n: int, d: int, m: int, noise: float, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5  # correlated columns
    theta = torch.randn(d, m, generator=g, dtype=torch.float64)
    y = x @ theta + noise * torch.randn(n, m, generator=g, dtype=torch.float64)
    return x, y, theta


def test_path_errors_match_a_brute_force_fit_on_the_rows() -> None:
    """Σ_k (‖X_k Θ_k − Y_k‖² − ‖Y_k‖²), Θ_k the ridge fit on the other folds' rows solved
    directly, for three folds of unequal size, with and without shrinkage."""
    x, y, _ = _problem(40, 6, 3, 0.3)
    theta0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = [(x[:10], y[:10]), (x[10:25], y[10:25]), (x[25:], y[25:])]
    folds = [(xk.T @ xk, xk.T @ yk) for xk, yk in parts]
    lambdas = [1e-3, 0.5, 7.0, 300.0]
    for alpha in (0.0, 0.4):
        got = ridge_path_errors(folds, theta0, lambdas, shrinkage=alpha)
        for i, lam in enumerate(lambdas):
            want = 0.0
            for k, (xk, yk) in enumerate(parts):
                xt = torch.cat([p[0] for j, p in enumerate(parts) if j != k])
                yt = torch.cat([p[1] for j, p in enumerate(parts) if j != k])
                h = xt.T @ xt
                a = (1 - alpha) * h + alpha * torch.diag(h.diagonal()) + lam * torch.eye(6,
                                                                                      dtype=h.dtype)
                theta = theta0 + torch.linalg.solve(a, xt.T @ yt - h @ theta0)
                want += float(((xk @ theta - yk) ** 2).sum() - (yk ** 2).sum())
            assert got[i].item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_fold_sums_split_rows_into_contiguous_chunks() -> None:
    x, y, _ = _problem(9, 3, 2, 0.1)
    sums = FoldSums(2)
    sums.add(x[:5], y[:5])
    sums.add(x[5:], y[5:])
    (h0, g0), (h1, g1) = sums.folds()
    first = torch.cat([x[:3], x[5:7]]), torch.cat([y[:3], y[5:7]])
    assert torch.allclose(h0, first[0].T @ first[0]) and torch.allclose(g0, first[0].T @ first[1])
    second = torch.cat([x[3:5], x[7:]]), torch.cat([y[3:5], y[7:]])
    assert torch.allclose(h1, second[0].T @ second[0])
    assert sums.rows == [5, 4]
    with pytest.raises(ValueError, match="2 folds"):
        FoldSums(1)


def test_choice_follows_the_rows_and_the_pull_of_the_start() -> None:
    """Few noisy rows and a start near the truth: a strong ridge (close to the start). Many
    clean rows: a weak one. And the choice beats the fixed default on fresh rows."""
    d, m = 12, 4
    x, y, theta = _problem(4000, d, m, 0.05, seed=3)
    near = theta + 0.05 * torch.randn(d, m, generator=torch.Generator().manual_seed(4),
                                       dtype=torch.float64)

    def choose(rows: int, noise: float) -> float:
        xs, ys, _ = _problem(rows, d, m, 0.0, seed=3)
        ys = xs @ theta + noise * torch.randn(rows, m, generator=torch.Generator().manual_seed(5),
                                              dtype=torch.float64)
        sums = FoldSums(2)
        sums.add(xs, ys)
        return cv_damp(sums.folds(), near)

    few, many = choose(16, 3.0), choose(4000, 0.05)
    assert few >= 1.0
    assert many <= 0.01

    # held-out error of the chosen ridge vs the default 0.01, with 16 noisy rows
    xs, _, _ = _problem(16, d, m, 0.0, seed=3)
    ys = xs @ theta + 3.0 * torch.randn(16, m, generator=torch.Generator().manual_seed(5),
                                        dtype=torch.float64)
    h = xs.T @ xs

    def fit(damp: float) -> torch.Tensor:
        lam = damp * float(h.diagonal().mean())
        return torch.linalg.solve(h + lam * torch.eye(d, dtype=h.dtype), xs.T @ ys + lam * near)

    err = {dmp: float(((x @ fit(dmp) - x @ theta) ** 2).mean()) for dmp in (few, 0.01)}
    assert err[few] < 0.5 * err[0.01]


def test_grid_and_ties() -> None:
    """A start that fits exactly: every ridge gives the same fit, the largest is taken."""
    x, y, theta = _problem(30, 4, 2, 0.0)
    sums = FoldSums(3)
    sums.add(x, y)
    assert cv_damp(sums.folds(), theta) == max(DAMP_GRID)
    with pytest.raises(ValueError, match="2 folds"):
        ridge_path_errors(sums.folds()[:1], theta, [1.0])


# --- in the refits ------------------------------------------------------------------------

@pytest.mark.parametrize("images", [4, 32])
def test_block_refit_with_a_cross_validated_ridge_generalises_at_least_as_well(
        images: int, toy_cut: Any, held_out_error: Any) -> None:
    """The toy transformer's block refit from 4 images (32 rows for 16-32 inputs) and from
    32: ``damp="auto"`` is no worse on held-out images than the fixed default with its
    few-rows floor, every layer gets a ridge from the grid or the floor, and the floor is
    never undercut."""
    import copy

    from netpress.prune.fisher import few_rows_damp
    from netpress.prune.refit import refit_blocks

    model, cut, data = toy_cut(images)
    fixed, auto = copy.deepcopy(cut.model), copy.deepcopy(cut.model)
    refit_blocks(fixed, cut.original, data, kept_rows=cut.kept_rows, norms=True)
    chosen: dict[str, float] = {}
    done = refit_blocks(auto, cut.original, data, kept_rows=cut.kept_rows, norms=True,
                        damp="auto", chosen=chosen)
    linear = [n for n in done if "norm" not in n]
    assert sorted(chosen) == sorted(linear)
    rows = images * 8  # an 8x8 image is 8 tokens
    for name, damp in chosen.items():
        layer = auto.get_submodule(name)
        floor = few_rows_damp(0.01, layer.in_features, rows)
        assert damp >= floor - 1e-12
        assert damp in DAMP_GRID or damp == pytest.approx(floor)
    err_fixed, err_auto = held_out_error(fixed, model), held_out_error(auto, model)
    assert err_auto <= 1.02 * err_fixed, (err_auto, err_fixed)


def test_fisherprune_auto_is_the_default_reports_its_choice_and_refuses_other_strings() -> None:
    import warnings

    import netpress as npr
    from netpress.errors import RecipeError
    from netpress.testing import toy_batches, toy_transformer

    assert npr.FisherPrune().damp == "auto"
    model = toy_transformer()
    data = toy_batches(n=4, batch=4)
    x = data[0][0][:1]
    for scope in ("blocks", "readers"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = npr.compress(model, [npr.FisherPrune(macs=0.6, refit_scope=scope)],
                               calibration=data, example_inputs=x, measure=False)
        step = res.report["steps"][0]
        damps = step["refit_damp"]
        assert damps and all(v > 0 for v in damps.values()), scope
        assert len(damps) <= step["refitted_layers"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = npr.compress(model, [npr.FisherPrune(macs=0.6, damp=0.5)], calibration=data,
                             example_inputs=x, measure=False)
    assert set(fixed.report["steps"][0]["refit_damp"].values()) == {0.5}
    with pytest.raises(RecipeError, match=r"damp='cv' must be a number > 0 or 'auto'"):
        npr.FisherPrune(damp="cv")


def test_ridge_refit_auto_on_plentiful_rows_is_least_squares() -> None:
    """Many clean rows: the cross-validated ridge is at most the 0.01 floor, the refit is
    the plain ridge at that value, and it fits within 1% of exact least squares."""
    from netpress.prune.fisher import RefitStats, ridge_refit

    g = torch.Generator().manual_seed(2)
    xo = torch.randn(3000, 5, generator=g) @ torch.randn(5, 5, generator=g)
    kept = torch.tensor([0, 2, 3])
    xc = xo[:, kept] + 0.1 * torch.randn(3000, 3, generator=g)
    w, b = torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    stats = RefitStats(folds=2)
    for part in range(3):  # three batches
        stats.add(xc[part * 1000:(part + 1) * 1000], xo[part * 1000:(part + 1) * 1000])
    used: list[float] = []
    w2, b2 = ridge_refit(w, b, kept, stats, damp="auto", chosen=used)
    assert used[0] <= 0.01
    same = ridge_refit(w, b, kept, stats, damp=used[0])
    assert all(torch.equal(p, q) for p, q in zip((w2, b2), same))
    design = torch.cat([xc, torch.ones(3000, 1)], 1).double()
    target = (xo @ w.T + b).double()
    sol = torch.linalg.lstsq(design, target).solution
    err_ls = float((design @ sol - target).norm())
    err_auto = float((design[:, :-1] @ w2.double().T + b2.double() - target).norm())
    assert err_auto <= 1.01 * err_ls
