"""LayerNorm gain/shift refit after head/FFN pruning (FisherPrune(refit_norms=True))."""

from __future__ import annotations

import copy

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.prune._blocks import BlockCalls
from netpress.prune.fisher import ridge_affine
from netpress.prune.posttraining import FisherPrune, fisher_cut
from netpress.prune.refit import plan_linear_groups, refit_blocks
from netpress.testing import toy_batches, toy_transformer


def test_ridge_affine_matches_per_channel_stacked_least_squares():
    torch.manual_seed(0)
    n, y = torch.randn(50, 3).double(), torch.randn(50, 3).double()
    g0, b0, damp = torch.randn(3).double(), torch.randn(3).double(), 0.1
    gain, shift = ridge_affine(n, y, g0, b0, damp)
    lam = damp * float((n * n).sum(0).mean())
    for c in range(3):  # min ||[n 1] θ - y||² + lam ||θ - θ0||², stacked
        a = torch.cat([torch.stack([n[:, c], torch.ones(50).double()], 1),
                       lam ** 0.5 * torch.eye(2, dtype=torch.float64)])
        b = torch.cat([y[:, c], lam ** 0.5 * torch.stack([g0[c], b0[c]])])
        brute = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
        torch.testing.assert_close(torch.stack([gain[c], shift[c]]), brute)
    exact = ridge_affine(n, 2.0 * n + 0.5, g0, b0, 1e-9)  # exact affine targets are found
    torch.testing.assert_close(exact[0], torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(exact[1], torch.full((3,), 0.5, dtype=torch.float64))


def _data():
    return [x for x, _ in toy_batches(n=96, batch=32)]


def test_norms_join_the_plan_in_call_order():
    model = toy_transformer()
    calls = BlockCalls.record(model, model.blocks, _data())
    block = model.blocks[0]
    plan = plan_linear_groups(block, lambda: calls.run(block, 0, 0), norms=True)
    assert plan == [["norm1"], ["q", "k", "v"], ["o"], ["norm2"], ["up"], ["down"]]


def test_norm_refit_brings_the_cut_closer_and_is_a_no_op_on_itself():
    model = toy_transformer()
    data = _data()
    work = copy.deepcopy(model)
    done = refit_blocks(work, model, data, damp=1e-6, norms=True)
    assert sum(n.endswith(("norm1", "norm2")) for n in done) == 2 * len(model.blocks)
    for a, b in zip(work.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    cut = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=3, min_fraction=0.0),
                     data[0], data)
    plain = copy.deepcopy(cut.model)
    refit_blocks(plain, cut.original, data, kept_rows=cut.kept_rows)
    refit_blocks(cut.model, cut.original, data, kept_rows=cut.kept_rows, norms=True)
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x)
        err_plain = float((plain(x) - ref).pow(2).mean())
        err_norms = float((cut.model(x) - ref).pow(2).mean())
    assert err_norms < err_plain, (err_plain, err_norms)


def test_refit_norms_option():
    cfg = npr.FisherPrune(macs=0.6, calibration_batches=2, refit_norms=False)
    assert npr.FisherPrune.from_dict(cfg.to_dict()) == cfg
    assert npr.FisherPrune().refit_norms and npr.FisherPrune().min_fraction == 0.3
    with pytest.raises(RecipeError, match="refit_norms"):
        npr.FisherPrune(refit_norms="yes")  # type: ignore[arg-type]


def test_min_fraction_keeps_a_share_of_every_group():
    model = toy_transformer()
    data = _data()
    plain = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=3, min_fraction=0.0),
                       data[0], data)
    capped = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=3,
                                           min_fraction=0.3), data[0], data)
    assert any(k < 0.3 * t for t, k in plain.summary["groups"].values())
    for total, kept in capped.summary["groups"].values():
        assert kept >= 0.3 * total
    assert capped.summary["macs_after"] <= plain.summary["macs_after"] * 1.1
    with pytest.raises(RecipeError, match="min_fraction"):
        npr.FisherPrune(min_fraction=1.0)
