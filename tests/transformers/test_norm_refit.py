"""LayerNorm gain/shift refit after head/FFN pruning (FisherPrune(refit_norms=True))."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import netpress as npr
from netpress.errors import RecipeError
from netpress.prune._blocks import BlockCalls
from netpress.prune.fisher import ridge_affine
from netpress.prune.posttraining import FisherPrune, fisher_cut, target_floor
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
    # 50%: since count_macs counts the toy's attention (11% of its MACs), a 60% cut is
    # shallower and the norm refit gains nothing measurable there (5.3453e-4 vs 5.3466e-4).
    # Fisher-ranked units: the OBS choice (the default) leaves the norms nothing to gain here
    # (1.02035e-3 with the norm refit vs 1.02002e-3 without)
    cut = fisher_cut(model, FisherPrune(macs=0.5, calibration_batches=3, min_fraction=0.0,
                                        rank="fisher"), data[0], data)
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
    default = npr.FisherPrune()
    assert default.refit_norms and default.min_fraction is None and default.min_share == 0.9
    with pytest.raises(RecipeError, match="refit_norms"):
        npr.FisherPrune(refit_norms="yes")  # type: ignore[arg-type]


def test_min_fraction_keeps_a_share_of_every_group():
    model = toy_transformer()
    data = _data()
    # 50%: with the toy's attention counted (11% of its MACs) the uncapped 60% cut keeps
    # at least 34% of every group, so a 0.3 floor would not bind
    plain = fisher_cut(model, FisherPrune(macs=0.5, calibration_batches=3, min_fraction=0.0),
                       data[0], data)
    capped = fisher_cut(model, FisherPrune(macs=0.5, calibration_batches=3,
                                           min_fraction=0.3), data[0], data)
    assert any(k < 0.3 * t for t, k in plain.summary["groups"].values())
    for total, kept in capped.summary["groups"].values():
        assert kept >= 0.3 * total
    assert capped.summary["macs_after"] <= plain.summary["macs_after"] * 1.1
    with pytest.raises(RecipeError, match="min_fraction"):
        npr.FisherPrune(min_fraction=1.0)


def test_target_floor_is_the_share_of_the_removable_macs_left():
    # 1000 MACs, 200 of them fixed: a goal of 600 leaves (600-200)/800 = 0.5 on average
    assert target_floor(600, 1000, 200, 0.9) == pytest.approx(0.45)
    assert target_floor(600, 1000, 0, 1.0) == pytest.approx(0.6)
    assert target_floor(100, 1000, 200, 0.9) == 0.0  # the goal is below the fixed part
    assert target_floor(600, 200, 200, 0.9) == 0.0  # nothing removable
    assert target_floor(2000, 1000, 0, 0.9) == 1.0


def test_default_floor_follows_the_target():
    model = toy_transformer()
    data = _data()
    for macs in (0.4, 0.6):
        cut = fisher_cut(model, FisherPrune(macs=macs, calibration_batches=3), data[0], data)
        floor = cut.summary["min_fraction"]
        # nearly every MAC of the toy is removable: the floor is a bit under 0.9 * macs,
        # and every group keeps it (rounded down where rounding up would miss the target:
        # 4 heads at macs=0.4)
        assert 0.75 * macs < floor <= 0.9 * macs + 1e-9, (macs, floor)
        for total, kept in cut.summary["groups"].values():
            assert kept >= math.floor(floor * total + 1e-9)
        assert cut.summary["macs_after"] <= cut.summary["macs_target"] * 1.02
    nearly_uniform = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=3,
                                                   min_share=1.0), data[0], data)
    shares = [k / t for t, k in nearly_uniform.summary["groups"].values()]
    # the whole average share as the floor (0.58): 2 of 4 heads and 9 of 16 neurons at least
    assert nearly_uniform.summary["min_fraction"] > 0.55 and min(shares) >= 0.5, shares
    with pytest.raises(RecipeError, match="min_share"):
        npr.FisherPrune(min_share=1.5)


def test_an_explicit_floor_the_target_cannot_meet_is_a_clear_error():
    model = toy_transformer()
    data = _data()
    with pytest.raises(RecipeError, match=r"min_fraction \(the floor in force: 0\.900\)"):
        fisher_cut(model, FisherPrune(macs=0.3, calibration_batches=3, min_fraction=0.9),
                   data[0], data)
