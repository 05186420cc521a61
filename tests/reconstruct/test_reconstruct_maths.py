"""The reconstruction maths against brute-force least squares on tiny matrices."""

import numpy as np
import pytest
import torch

from netpress.prune.masks import magnitude_mask
from netpress.reconstruct.gptq import gptq_quantize, gptq_round, group_qparams, rtn_quantize
from netpress.reconstruct.lstsq import masked_lstsq, refit_target
from netpress.reconstruct.obs import damped, hinv_cholesky, obs_remove, obs_sweep
from netpress.reconstruct.patterns import holds_nm, nm_keep_mask, parse_pattern, split_count
from netpress.reconstruct.sparsegpt import sparsegpt, wanda_mask, wanda_scores


def _data(n=64, d=8, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    w = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return x, w, x.T @ x / n


def _out_err(x, w_new, w):
    return float(((x @ (w_new - w).T) ** 2).sum())


def _brute_sweep(w0, h, compress):
    """Column by column: fix column j, then the best values of the columns right of it."""
    w = w0.clone()
    d = w.shape[1]
    for j in range(d):
        w[:, j] = compress(j, w[:, j])
        fixed, free = slice(0, j + 1), slice(j + 1, d)
        if j + 1 < d:
            e_fixed = w[:, fixed] - w0[:, fixed]
            w[:, free] = w0[:, free] - torch.linalg.solve(h[free, free], h[free, fixed]
                                                          @ e_fixed.T).T
    return w


def test_obs_remove_matches_constrained_least_squares():
    x, w, h = _data()
    row = w[0]
    new, hinv2, loss = obs_remove(row, torch.linalg.inv(h), q=2, value=0.3)
    # brute force: minimise ‖X(v - row)‖² with v_2 = 0.3, the other 7 free
    free = [i for i in range(8) if i != 2]
    target = x @ row - 0.3 * x[:, 2]
    sol = np.linalg.lstsq(x[:, free].numpy(), target.numpy(), rcond=None)[0]
    expect = row.clone()
    expect[free] = torch.from_numpy(sol)
    expect[2] = 0.3
    assert torch.allclose(new, expect, atol=1e-9)
    assert loss == pytest.approx(_out_err(x, new[None], row[None]) / x.shape[0], rel=1e-9)
    assert torch.allclose(hinv2[2], torch.zeros(8, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("blocksize", [1, 3, 128])
def test_obs_sweep_equals_brute_force_sequential_optimum(blocksize):
    x, w, h = _data(d=7)
    grid = 0.25

    def compress(j, col):
        return torch.round(col / grid) * grid

    expect = _brute_sweep(w, h, compress)
    got, loss = obs_sweep(w, hinv_cholesky(h, damp=0.0),
                          lambda j, i, block, diag: compress(j, block[:, i]), blocksize)
    assert torch.allclose(got, expect, atol=1e-9)
    assert float(loss.sum()) == pytest.approx(_out_err(x, got, w) / x.shape[0], rel=1e-6)


def test_sparsegpt_with_a_fixed_mask_is_the_brute_force_sweep():
    x, w, h = _data(d=8, rows=4)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, 8, generator=g) > 0.5
    got, keep = sparsegpt(w, h, mask=mask, blocksize=3, damp=0.0)
    expect = _brute_sweep(w, h, lambda j, col: torch.where(mask[:, j], col, 0.0))
    assert torch.equal(keep, mask)
    assert torch.allclose(got, expect, atol=1e-9)
    assert torch.all(got[~mask] == 0)


def test_sparsegpt_prunes_the_exact_count_and_beats_magnitude():
    x, w, h = _data(n=256, d=32, rows=8, seed=1)
    pruned, keep = sparsegpt(w, h, sparsity=0.6, blocksize=8)
    assert int((~keep).sum()) == round(0.6 * w.numel())
    assert torch.equal(pruned != 0, keep)
    magnitude = w * magnitude_mask(w, 0.6)
    assert _out_err(x, pruned, w) < 0.8 * _out_err(x, magnitude, w)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_sparsegpt_nm_pattern_holds_exactly(pattern):
    n, m = parse_pattern(pattern)
    x, w, h = _data(n=128, d=16, rows=5, seed=2)
    pruned, keep = sparsegpt(w, h, n_m=(n, m), blocksize=8)
    assert holds_nm(pruned, n, m) and holds_nm(keep, n, m)
    assert int(keep.sum()) == 5 * 16 * n // m


def test_nm_helpers():
    scores = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0, 0.0, 5.0, 1.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[False, True, True, False,
                                                    False, False, True, True]]
    assert nm_keep_mask(torch.zeros(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    assert not holds_nm(torch.ones(1, 4), 2, 4) and holds_nm(torch.zeros(1, 4), 2, 4)
    assert split_count(10, [3, 3, 4]) == [3, 3, 4] and sum(split_count(7, [5, 5, 5])) == 7
    for bad in ("2-4", "4:2", "0:4", "unstr"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_wanda_scores_and_mask():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    sq = torch.tensor([4.0, 1.0, 0.25, 16.0])
    assert torch.allclose(wanda_scores(w, sq), torch.tensor([[2.0, 2.0, 1.5, 2.0],
                                                             [8.0, 1.0, 0.5, 8.0]]))
    keep = wanda_mask(w, sq, sparsity=0.5)
    assert keep.sum(1).tolist() == [2, 2]  # per-output comparison groups
    assert keep[1].tolist() == [True, False, False, True]


def test_masked_lstsq_matches_numpy_per_row():
    x, w, h = _data(n=50, d=6, rows=3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1]]).bool()
    got = masked_lstsq(w, h, mask, damp=0.0)
    for r in range(3):
        s = mask[r].numpy()
        sol = np.linalg.lstsq(x.numpy()[:, s], (x @ w[r]).numpy(), rcond=None)[0]
        assert np.allclose(got[r].numpy()[s], sol, atol=1e-9)
        assert np.all(got[r].numpy()[~s] == 0)


def test_refit_target_maps_compressed_inputs_to_original_outputs():
    x_o, w, _ = _data(n=80, d=5)
    x_c = x_o + 0.3 * torch.randn(80, 5, generator=torch.Generator().manual_seed(9),
                                  dtype=torch.float64)
    h, cross = x_c.T @ x_c / 80, x_o.T @ x_c / 80
    got = refit_target(w, h, cross, damp=0.0)
    sol = np.linalg.lstsq(x_c.numpy(), (x_o @ w.T).numpy(), rcond=None)[0].T
    assert np.allclose(got.numpy(), sol, atol=1e-9)
    assert torch.equal(refit_target(w, h, h, damp=0.01), w)  # same inputs: W itself


def test_damped_keeps_dead_inputs_invertible():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    assert torch.diagonal(damped(h, 0.01)).tolist() == [2.02, 0.02, 4.02]
    assert torch.isfinite(hinv_cholesky(torch.zeros(3, 3, dtype=torch.float64))).all()


def test_gptq_round_is_the_brute_force_sweep_and_beats_rtn():
    x, w, h = _data(n=200, d=16, rows=6, seed=4)
    scale, zero = group_qparams(w, 4, symmetric=True)
    codes = gptq_round(w, h, scale, bits=4, symmetric=True, blocksize=5, damp=0.0)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7
    s = scale.double()[:, None]
    expect = _brute_sweep(w, h, lambda j, col: torch.clamp(torch.round(col / s[:, 0]), -7, 7)
                          * s[:, 0])
    assert torch.equal(codes.double() * s, expect)
    rtn = torch.clamp(torch.round(w / s), -7, 7) * s
    assert _out_err(x, codes.double() * s, w) < 0.7 * _out_err(x, rtn, w)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_quantize_grids_and_error(act_order, symmetric, group_size):
    x, w, h = _data(n=300, d=16, rows=6, seed=5)
    res = gptq_quantize(w, h, 3, group_size=group_size, symmetric=symmetric,
                        act_order=act_order)
    groups = torch.arange(16) // (group_size or 16)
    deq = (res.codes.double() - res.zero[:, groups]) * res.scale.double()[:, groups]
    assert torch.equal(deq, res.weight)
    assert res.scale.shape == (6, 16 // (group_size or 16))
    assert torch.equal(res.scale, res.scale.half().float())
    lo, hi = (-3, 3) if symmetric else (0, 7)
    assert int(res.codes.min()) >= lo and int(res.codes.max()) <= hi
    rtn = rtn_quantize(w, 3, group_size=group_size, symmetric=symmetric)
    assert _out_err(x, res.weight, w) < 0.8 * _out_err(x, rtn.weight, w)


def test_gptq_keeps_masked_weights_exactly_zero():
    x, w, h = _data(n=100, d=8, rows=4, seed=6)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.4
    for sym in (True, False):
        res = gptq_quantize(w, h, 4, symmetric=sym, mask=mask)
        assert torch.all(res.weight[~mask] == 0)
        assert torch.all(rtn_quantize(w, 4, symmetric=sym, mask=mask).weight[~mask] == 0)
