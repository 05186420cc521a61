"""Size, MACs and latency of toy models."""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from netpress.errors import ArtefactError, DataError
from netpress.measure.latency import LatencyStats, measure_latency
from netpress.measure.macs import count_macs, count_sparse_macs, layer_macs
from netpress.measure.size import (
    file_bytes,
    nonzero_parameter_count,
    parameter_count,
    state_dict_bytes,
)


def _linear() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))


def _half_zero(model: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        layer = model[1]
        assert isinstance(layer, nn.Linear)
        layer.weight[:, :8] = 0.0
    return model


def test_parameter_counts_and_bytes(tmp_path: Path) -> None:
    model = _linear()
    assert parameter_count(model) == 68
    assert nonzero_parameter_count(model) == 68
    assert nonzero_parameter_count(_half_zero(model)) == 36
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == len(buffer.getvalue()) > 68 * 4
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 123)
    assert file_bytes(path) == 123
    with pytest.raises(ArtefactError, match="missing.bin"):
        file_bytes(tmp_path / "missing.bin")


def test_macs_of_linear_and_conv() -> None:
    assert count_macs(_linear(), torch.randn(1, 16)) == 64
    assert count_macs(_linear(), torch.randn(3, 16)) == 192
    conv = nn.Conv2d(3, 8, kernel_size=3)
    # output 8 x 6 x 6, each 3 * 3 * 3 MACs
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 6 * 6 * 27
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    assert count_macs(net, torch.randn(1, 3, 8, 8)) == 7776 + 288 * 4
    assert layer_macs(net, torch.randn(1, 3, 8, 8)) == {"0": 7776, "3": 1152}


def test_sparse_macs_scale_with_density() -> None:
    model = _linear()
    x = torch.randn(1, 16)
    assert count_sparse_macs(model, x) == 64
    assert count_sparse_macs(_half_zero(model), x) == 32
    assert count_macs(model, x) == 64  # the dense count does not change
    pruned = _linear()
    prune.l1_unstructured(pruned[1], name="weight", amount=0.75)
    assert count_sparse_macs(pruned, x) == 16
    conv = nn.Conv2d(3, 8, kernel_size=3)
    with torch.no_grad():
        conv.weight[:4] = 0.0
    assert count_sparse_macs(conv, torch.randn(1, 3, 8, 8)) == 7776 // 2


def test_macs_keep_training_flag_and_report_bad_inputs() -> None:
    model = _linear().train()
    count_macs(model, torch.randn(1, 16))
    assert model.training
    with pytest.raises(DataError, match="example inputs"):
        count_macs(model, torch.randn(1, 5))


def test_latency_stats_and_thread_restore() -> None:
    model = _linear().train()
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = measure_latency(model, torch.randn(1, 16), batch_sizes=(1, 4), threads=1,
                                warmup=1, repeats=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
    assert set(stats) == {1, 4}
    for size, s in stats.items():
        assert isinstance(s, LatencyStats)
        assert s.median_ms > 0 and s.p10_ms <= s.median_ms <= s.p90_ms
        assert s.repeats == 3 and s.batch_size == size and s.threads == 1
    assert set(stats[1].to_dict()) == {"median_ms", "p10_ms", "p90_ms", "mean_ms", "repeats",
                                       "batch_size", "threads"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats[1].median_ms = 0.0  # type: ignore[misc]
    assert model.training


def test_latency_min_time_and_errors_restore_threads() -> None:
    before = torch.get_num_threads()
    stats = measure_latency(_linear(), torch.randn(2, 16), batch_sizes=(1,), warmup=0,
                            repeats=1, min_time_s=0.005)
    assert stats[1].repeats > 1
    with pytest.raises(DataError, match="does not fit"):
        measure_latency(_linear(), torch.randn(1, 5), batch_sizes=(1,), threads=1, repeats=1)
    assert torch.get_num_threads() == before
    with pytest.raises(DataError, match="batch_sizes"):
        measure_latency(_linear(), torch.randn(1, 16), batch_sizes=(0,))


def test_quantized_layers_are_counted_analytically() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            _half_zero(_linear()), {nn.Linear}, dtype=torch.qint8
        )
    x = torch.randn(1, 16)
    assert count_macs(quantized, x) == 64  # the counter itself sees no FLOPs in int8 kernels
    assert count_sparse_macs(quantized, x) == 32
    assert layer_macs(quantized, torch.randn(2, 16)) == {"1": 128}


def test_interleaved_latency_times_every_model_and_restores_threads():
    import torch
    from torch import nn

    from netpress.measure import measure_latency_interleaved

    a, b = nn.Linear(16, 4), nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 4))
    before = torch.get_num_threads()
    ra, rb = measure_latency_interleaved([a, b], torch.randn(1, 16), batch_sizes=(1, 8),
                                         repeats=10, rounds=5, warmup=1)
    assert torch.get_num_threads() == before
    assert set(ra) == set(rb) == {1, 8}
    assert ra[8].repeats == rb[8].repeats == 10
    assert ra[1].median_ms > 0 and rb[1].median_ms > 0
