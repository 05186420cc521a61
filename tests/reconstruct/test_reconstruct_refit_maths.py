"""The least-squares refit after columns were removed, with and without a bias, against
brute-force least squares; the composition of kept indices over pruning rounds."""

import numpy as np
import pytest
import torch

from netpress.reconstruct.lstsq import refit_target, with_bias
from netpress.reconstruct.obs import greedy_unit_order, remove_unit, unit_removal_costs
from netpress.reconstruct.structured import compose_kept


def _inputs(n=120, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_o = torch.randn(n, d, generator=g, dtype=torch.float64) \
        @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(3, d, generator=g, dtype=torch.float64)
    return x_o, w, g


def test_refit_of_the_kept_columns_is_least_squares_on_the_original_outputs():
    x_o, w, g = _inputs()
    kept = torch.tensor([0, 2, 3, 5])
    x_c = x_o[:, kept] + 0.2 * torch.randn(120, 4, generator=g, dtype=torch.float64)
    n = x_c.shape[0]
    h, cross = x_c.T @ x_c / n, x_o.T @ x_c / n
    got = refit_target(w, h, cross, damp=0.0, start=w[:, kept])
    sol = np.linalg.lstsq(x_c.numpy(), (x_o @ w.T).numpy(), rcond=None)[0].T
    assert np.allclose(got.numpy(), sol, atol=1e-8)
    # a ridge: more damping stays closer to the start
    far = refit_target(w, h, cross, damp=1e3, start=w[:, kept])
    assert float((far - w[:, kept]).norm()) < 0.05 * float((got - w[:, kept]).norm())


def test_refit_with_bias_fits_the_intercept_too():
    x_o, w, g = _inputs(seed=1)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    kept = torch.tensor([1, 2, 4])
    x_c = x_o[:, kept] * 0.7 + 0.3  # scaled and shifted: a bias is needed to undo it
    n = x_c.shape[0]
    h, m = with_bias(x_c.T @ x_c / n, x_o.T @ x_c / n, x_c.mean(0), x_o.mean(0))
    full = torch.cat([w, b[:, None]], 1)
    start = torch.cat([w[:, kept], b[:, None]], 1)
    got = refit_target(full, h, m, damp=0.0, start=start)
    design = torch.cat([x_c, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = np.linalg.lstsq(design.numpy(), (x_o @ w.T + b).numpy(), rcond=None)[0].T
    assert np.allclose(got.numpy(), sol, atol=1e-8)


def test_refit_checks_shapes():
    x_o, w, _ = _inputs()
    h = x_o.T @ x_o
    with pytest.raises(ValueError, match="start="):
        refit_target(w, h[:4, :4], h[:, :4])
    with pytest.raises(ValueError, match="start"):
        refit_target(w, h[:4, :4], h[:, :4], start=w)


def test_compose_kept_maps_every_round_back_to_the_original_tensor():
    rounds = [{0: torch.tensor([0, 2, 3, 5, 7]), 1: torch.tensor([1, 2])},
              {0: torch.tensor([1, 3, 4])}]
    got = compose_kept(rounds)
    assert got[0].tolist() == [2, 5, 7] and got[1].tolist() == [1, 2]
    assert compose_kept([]) == {}


def _lstsq_error(x, w, removed_cols):
    """The least output error ‖X(W' - W)ᵀ‖²/n with the columns ``removed_cols`` of W' zero."""
    keep = [c for c in range(x.shape[1]) if c not in set(removed_cols)]
    target = x @ w.T
    if not keep:
        return float(target.pow(2).sum()) / x.shape[0]
    sol = np.linalg.lstsq(x[:, keep].numpy(), target.numpy(), rcond=None)[0]
    return float(((x[:, keep] @ torch.from_numpy(sol)) - target).pow(2).sum()) / x.shape[0]


def test_group_obs_costs_and_greedy_order_match_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) \
        @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    w1 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, 8, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(x.T @ x / 200)
    units = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]),
             torch.tensor([6, 7])]
    costs = unit_removal_costs(w1, hinv, units)
    for u, cols in enumerate(units):
        assert float(costs[u]) == pytest.approx(_lstsq_error(x, w1, cols.tolist()), rel=1e-7)
    # the compensated weights are the least-squares solution with the unit's columns zero
    new_w, new_hinv = remove_unit(w1, hinv, units[1])
    assert torch.all(new_w[:, 2:4] == 0) and torch.all(new_hinv[2:4] == 0)
    err = float(((x @ (new_w - w1).T) ** 2).sum()) / 200
    assert err == pytest.approx(_lstsq_error(x, w1, [2, 3]), rel=1e-7)
    # greedy over two readers of the same units: brute-force greedy on the summed errors
    order, added = greedy_unit_order([(w1, hinv, units), (w2, hinv, units)])
    removed: list[int] = []
    for step, unit in enumerate(order):
        def joint(vs):
            cols = [c for v in vs for c in units[v].tolist()]
            return _lstsq_error(x, w1, cols) + _lstsq_error(x, w2, cols)
        best = min((u for u in range(4) if u not in removed), key=lambda u: joint([*removed, u]))
        assert unit == best
        gain = joint([*removed, unit]) - joint(removed)
        assert added[step] == pytest.approx(gain, rel=1e-6, abs=1e-9)
        removed.append(unit)
    with pytest.raises(ValueError, match="same units"):
        greedy_unit_order([(w1, hinv, units), (w2, hinv, units[:2])])
