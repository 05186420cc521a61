"""Observers: ranges from min-max, moving average, percentile, MSE and entropy calibration."""

import pytest
import torch

from netpress.quant.observers import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    entropy_range,
    make_observer,
    mse_range,
    percentile_range,
)
from netpress.quant.primitives import choose_qparams, fake_quantize, sqnr


def _heavy_tailed(n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -50.0])  # a few outliers
    return x


def test_minmax_accumulates_over_batches_and_per_channel():
    obs = MinMaxObserver()
    obs.update(torch.tensor([0.5, 2.0]))
    obs.update(torch.tensor([-1.0, 1.0]))
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 2.0)
    per_ch = MinMaxObserver(axis=1)
    per_ch.update(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    assert per_ch.min_val.tolist() == [1.0, -2.0] and per_ch.max_val.tolist() == [3.0, 0.5]
    scale, zp = per_ch.qparams(8, symmetric=True)
    assert scale.shape == (2,) and zp.tolist() == [0, 0]


def test_moving_average_moves_by_momentum():
    obs = MovingAverageObserver(momentum=0.5)
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.tensor([0.0, 2.0]))
    assert float(obs.max_val) == pytest.approx(3.0)


def test_percentile_clips_outliers():
    lo, hi = percentile_range(_heavy_tailed(), 99.9)
    assert 2.5 < float(hi) < 4.5 and -4.5 < float(lo) < -2.5


def test_clipping_observers_beat_minmax_on_heavy_tails():
    x = _heavy_tailed()
    results = {}
    for name in ("minmax", "percentile", "mse", "entropy", "moving_average"):
        obs = make_observer(name)
        for chunk in x.split(5000):
            obs.update(chunk)
        scale, zp = obs.qparams(4)
        results[name] = sqnr(x, fake_quantize(x, scale, zp, 4))
    assert results["mse"] > results["minmax"] + 3
    assert results["percentile"] > results["minmax"]
    assert results["entropy"] > results["minmax"]


def test_mse_range_per_row_is_no_worse_than_minmax():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 12.0
    lo, hi = mse_range(w, 4, symmetric=True)
    assert lo.shape == (8,) and float(hi[0]) < 12.0

    def row_mse(bounds):
        scale, zp = choose_qparams(*bounds, 4, symmetric=True)
        return (fake_quantize(w, scale, zp, 4, symmetric=True, axis=0) - w).pow(2).mean(1)

    best, minmax_err = row_mse((lo, hi)), row_mse((w.amin(1), w.amax(1)))
    assert bool((best <= minmax_err + 1e-7).all())
    assert float(best[0]) < float(minmax_err[0])  # the outlier row gains

def test_entropy_range_is_inside_the_observed_range():
    x = _heavy_tailed()
    lo, hi = entropy_range(x, 8)
    assert float(x.min()) <= float(lo) and float(hi) <= float(x.max())
    assert float(hi) < 40.0


def test_sample_observers_stay_bounded():
    obs = PercentileObserver(max_samples=1024)
    for _ in range(50):
        obs.update(torch.randn(10_000))
    assert obs.samples().numel() <= 2048


def test_errors():
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("nope")
    with pytest.raises(ValueError, match="per tensor"):
        MSEObserver(axis=0)
    with pytest.raises(RuntimeError, match="no data"):
        EntropyObserver().qparams(8)


def test_entropy_ignores_the_relu_zero_spike():
    x = torch.relu(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    lo, hi = entropy_range(x, 8)
    assert float(lo) == 0.0 and 3.0 < float(hi) <= float(x.max())
