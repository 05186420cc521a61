"""Block-by-block least-squares refits after head/FFN pruning (netpress.prune.refit)."""

from __future__ import annotations

import copy

import torch

from netpress.prune._blocks import BlockCalls
from netpress.prune.fisher import ridge_solve
from netpress.prune.posttraining import FisherPrune, fisher_cut
from netpress.prune.refit import plan_linear_groups, refit_blocks, residual_sink
from netpress.testing import toy_batches, toy_transformer


def test_ridge_solve_matches_the_stacked_least_squares_problem():
    torch.manual_seed(0)
    x, y, theta0 = torch.randn(40, 5).double(), torch.randn(40, 3).double(), \
        torch.randn(5, 3).double()
    damp = 0.05
    lam = damp * float((x.T @ x).diagonal().mean())
    # brute force: min ||X T - Y||^2 + lam ||T - T0||^2 as one stacked least-squares problem
    a = torch.cat([x, lam ** 0.5 * torch.eye(5, dtype=torch.float64)])
    b = torch.cat([y, lam ** 0.5 * theta0])
    brute = torch.linalg.lstsq(a, b).solution
    torch.testing.assert_close(ridge_solve(x.T @ x, x.T @ y, theta0, damp), brute)


def _data():
    return [x for x, _ in toy_batches(n=96, batch=32)]


def test_blocks_run_one_at_a_time_reproduce_the_model():
    model = toy_transformer()
    data = _data()
    calls = BlockCalls.record(model, model.blocks, data)
    for i, block in enumerate(model.blocks):
        calls.advance(block, i)
    with torch.no_grad():
        h = model.embed(data[0].flatten(1, 2))
        for block in model.blocks:
            h = block(h)
    torch.testing.assert_close(calls.hidden[0], h)


def test_groups_and_residual_sinks_of_a_block():
    model = toy_transformer()
    calls = BlockCalls.record(model, model.blocks, _data())
    block = model.blocks[0]

    def run():
        return calls.run(block, 0, 0)

    assert plan_linear_groups(block, run) == [["q", "k", "v"], ["o"], ["up"], ["down"]]
    assert residual_sink(block, "o", run) == "norm2"
    assert residual_sink(block, "down", run) == "<block output>"
    assert residual_sink(block, "up", run) is None


def test_refit_towards_itself_changes_nothing():
    model = toy_transformer()
    work = copy.deepcopy(model)
    done = refit_blocks(work, model, _data(), damp=1e-6)
    assert len(done) == 3 * 6
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(work(x), model(x), rtol=1e-4, atol=1e-4)


def test_refit_after_a_cut_is_closer_to_the_original():
    model = toy_transformer()
    data = _data()
    cut = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=3), data[0], data)
    before = copy.deepcopy(cut.model)
    refit_blocks(cut.model, cut.original, data, kept_rows=cut.kept_rows)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        err_cut = float((before(x) - ref).pow(2).mean())
        err_refit = float((cut.model(x) - ref).pow(2).mean())
    assert err_refit < 0.5 * err_cut, (err_cut, err_refit)


def test_readers_scope_and_bad_scope():
    import pytest

    import netpress as npr
    from netpress.errors import RecipeError

    model = toy_transformer()
    data = toy_batches(n=64, batch=32)
    res = npr.compress(model, [FisherPrune(macs=0.6, calibration_batches=2,
                                           refit_scope="readers")],
                       calibration=data, example_inputs=data[0][0], measure=False)
    assert res.model(data[0][0]).isfinite().all()
    with pytest.raises(RecipeError, match="refit_scope"):
        npr.FisherPrune(refit_scope="everything")
