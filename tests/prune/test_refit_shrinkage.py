"""Hessian shrinkage in FisherPrune's least-squares refits (issue 11): the ridge solve with
shrunk sums, the block refit with few calibration rows, the setting and its report."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.prune import refit as refit_module
from netpress.prune.fisher import RefitStats, few_rows_damp, ridge_refit, ridge_solve
from netpress.prune.posttraining import FisherPrune
from netpress.prune.refit import refit_blocks
from netpress.reconstruct.shrinkage import Shrinker, shrunk
from netpress.testing import toy_batches, toy_transformer


def _problem(rows: int = 12, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    return x, torch.randn(rows, 3, generator=g, dtype=torch.float64), \
        torch.randn(d, 3, generator=g, dtype=torch.float64)


def test_ridge_solve_with_shrinkage_solves_for_the_correction_on_the_shrunk_sums():
    x, y, theta0 = _problem()
    h, damp, alpha = x.T @ x, 0.05, 0.3
    lam = damp * float(h.diagonal().mean())
    want = theta0 + torch.linalg.solve(
        shrunk(h, alpha) + lam * torch.eye(8, dtype=torch.float64), x.T @ y - h @ theta0)
    got = ridge_solve(h, x.T @ y, theta0, damp, shrinkage=alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # α = 1: every coefficient corrected on its own, by its column's residual / energy
    diag = ridge_solve(h, x.T @ y, theta0, damp, shrinkage=1.0)
    jacobi = theta0 + (x.T @ y - h @ theta0) / (h.diagonal() + lam)[:, None]
    torch.testing.assert_close(diag, jacobi)
    # a start that fits the rows exactly stays where it is, shrunk or not
    exact = ridge_solve(h, h @ theta0, theta0, damp, shrinkage=0.7)
    torch.testing.assert_close(exact, theta0, rtol=1e-10, atol=1e-10)


def test_ridge_solve_overwrite_with_shrinkage_gives_the_same_fit():
    x, y, theta0 = _problem()
    h = x.T @ x
    kept = ridge_solve(h, x.T @ y, theta0, 0.01, shrinkage=0.4)
    h2 = h.clone()
    torch.testing.assert_close(ridge_solve(h2, x.T @ y, theta0, 0.01, shrinkage=0.4,
                                           overwrite=True), kept, rtol=0, atol=0)
    assert not torch.equal(h2, h)  # the sums were used in place


def test_shrinkage_zero_is_the_plain_ridge_bit_for_bit():
    x, y, theta0 = _problem()
    h = x.T @ x
    assert torch.equal(ridge_solve(h, x.T @ y, theta0, 0.01, shrinkage=0.0),
                       ridge_solve(h, x.T @ y, theta0, 0.01))
    stats = RefitStats()
    stats.add(x[:, :6].float(), x.float())
    w, b = torch.randn(3, 8), torch.randn(3)
    plain = ridge_refit(w, b, torch.arange(6), stats)
    zero = ridge_refit(w, b, torch.arange(6), stats, shrinkage=0.0)
    assert all(torch.equal(p, z) for p, z in zip(plain, zero))


def test_block_refit_with_shrinkage_zero_reproduces_the_plain_refit_exactly(toy_cut):
    model, cut, data = toy_cut(4)
    plain, zero = copy.deepcopy(cut.model), copy.deepcopy(cut.model)
    refit_blocks(plain, cut.original, data, kept_rows=cut.kept_rows, norms=True)
    shrinker = Shrinker(0.0)
    refit_blocks(zero, cut.original, data, kept_rows=cut.kept_rows, norms=True,
                 shrinker=shrinker)
    for (name, p), z in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(p, z), name
    assert set(shrinker.alpha.values()) == {0.0} and len(shrinker.alpha) == 18


def test_block_refit_with_few_rows_generalises_better_floored_or_shrunk(monkeypatch, toy_cut,
                                                                         held_out_error):
    """Two 8x8 images: 16 calibration rows for the 16-wide layers (33 with the ones column
    and 32 inputs for ``down``). The plain ridge at damp=0.01 follows those rows: held-out
    relative output error 0.285; shrunk by the Ledoit-Wolf intensity (0.31 at most) 0.242;
    with the few-rows ridge floor (the default, :func:`few_rows_damp`) 0.210."""
    model, cut, data = toy_cut(2)
    floored = copy.deepcopy(cut.model)
    refit_blocks(floored, cut.original, data, kept_rows=cut.kept_rows)
    monkeypatch.setattr(refit_module, "few_rows_damp", lambda damp, inputs, rows: damp)
    plain, auto = copy.deepcopy(cut.model), copy.deepcopy(cut.model)
    refit_blocks(plain, cut.original, data, kept_rows=cut.kept_rows)
    shrinker = Shrinker("auto")
    refit_blocks(auto, cut.original, data, kept_rows=cut.kept_rows, shrinker=shrinker)
    err_plain, err_auto = held_out_error(plain, model), held_out_error(auto, model)
    err_floor = held_out_error(floored, model)
    assert err_auto < 0.9 * err_plain, (err_auto, err_plain)
    assert err_floor < 0.8 * err_plain, (err_floor, err_plain)
    assert 0.1 < max(shrinker.alpha.values()) < 0.6
    assert shrinker.summary()["min_rows_per_column"] < 1


def test_few_rows_damp():
    """The ridge floor: (inputs / rows)² up to 1 below 10 rows per input, never below the
    given damp; 10 rows per input or more leave any damp as it is."""
    assert few_rows_damp(0.01, 100, 1001) == 0.01
    assert few_rows_damp(1e-9, 4, 200) == 1e-9  # plentiful rows: an explicit damp stays
    assert few_rows_damp(1e-9, 100, 999) == pytest.approx(0.01, rel=0.01)
    assert few_rows_damp(0.01, 100, 10_000) == 0.01
    assert few_rows_damp(0.01, 100, 200) == pytest.approx(0.25)
    assert few_rows_damp(0.01, 100, 50) == 1.0
    assert few_rows_damp(2.0, 100, 50) == 2.0
    assert few_rows_damp(0.01, 100, 0) == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "ledoit", None])
def test_fisherprune_refuses_a_shrinkage_setting_it_cannot_use(bad):
    with pytest.raises(RecipeError, match=r"FisherPrune: shrinkage=.*'auto' or a number"):
        FisherPrune(shrinkage=bad)


def test_fisherprune_reports_the_shrinkage_and_warns_about_few_rows():
    """Opt-in (default 0: the refit as before); the report lists α per refitted Linear."""
    model = toy_transformer()
    data = toy_batches(n=2, batch=2)
    x = data[0][0][:1]

    def run(**kw: object) -> dict:
        res = npr.compress(model, [npr.FisherPrune(macs=0.6, **kw)], calibration=data,
                           example_inputs=x, measure=False)
        return res.report["steps"][0]

    with pytest.warns(UserWarning, match=r"FisherPrune: 3 layer\(s\) saw fewer calibration "
                      r"rows than inputs, e.g. 'blocks.0.down': 16 rows for 21 inputs.*"
                      r"not shrunk \(shrinkage=0\).*ridges were chosen by cross-validation "
                      r"on these samples \(refit_damp in the report.*held-out samples "
                      r"\(refit_guard.*refit=False"):
        default = run()
    with pytest.warns(UserWarning, match=r"let each refit's ridge be chosen on held-out "
                      r"samples \(damp='auto', the default\) or do not refit \(refit=False\)"):
        run(damp=0.01)
    assert len(default["shrinkage"]) == default["refitted_layers"] - 6  # norms: no entry
    assert set(default["shrinkage"].values()) == {0.0}
    assert default["min_rows_per_column"] == pytest.approx(16 / 21, abs=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto, fixed = run(shrinkage="auto"), run(shrinkage=0.25)
    assert 0.1 < max(auto["shrinkage"].values()) < 0.6
    assert set(fixed["shrinkage"].values()) == {0.25}
