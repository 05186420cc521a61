"""Parameters counted whatever their storage, storage in bits and bytes, and the MACs of
pruned-and-quantized layers, each against a hand-computed value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.measure.macs import count_macs, count_sparse_macs, macs_breakdown
from netpress.measure.size import (
    coded_weights,
    nonzero_parameter_count,
    parameter_count,
    storage_summary,
)
from netpress.report import ReportWarning
from netpress.report.rows import rows


def _half_zero_linear() -> nn.Sequential:
    """Linear(16, 4): weights +-1 (no quantization step rounds one to zero), half zeroed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 16).sign())
        model[1].weight[:, :8] = 0.0
    return model


def _weight_only(model: nn.Module, bits: int) -> nn.Module:
    return npr.compress(model, [npr.WeightOnly(bits=bits, weight_observer="minmax")],
                        measure=False).model


def test_quantized_weights_still_count_as_parameters() -> None:
    model = _half_zero_linear()
    int8 = _weight_only(model, 8)
    assert [c.module for c in coded_weights(int8)] == ["1"]
    # 16 x 4 weights + 4 biases, before and after: quantization removes nothing
    assert parameter_count(model) == parameter_count(int8) == 68
    # the 32 pruned weights stay zero through quantization (code 0): 32 + 4 biases
    assert nonzero_parameter_count(model) == nonzero_parameter_count(int8) == 36
    assert storage_summary(model) == {"params": 68, "bits": 68 * 32, "bits_per_param": 32.0,
                                      "bytes": 272, "formats": {"float32": 68}, "side_bits": 0}


def test_storage_in_bits_per_parameter_and_bytes() -> None:
    int8 = _weight_only(_half_zero_linear(), 8)
    # 64 weights x 8 bits + 4 float32 biases + 4 float32 per-channel scales
    bits = 64 * 8 + 4 * 32 + 4 * 32
    assert storage_summary(int8) == {"params": 68, "bits": bits, "bits_per_param": bits / 68,
                                     "bytes": bits // 8,
                                     "formats": {"float32": 4, "int8": 64}, "side_bits": 128}
    int4 = storage_summary(_weight_only(_half_zero_linear(), 4))
    assert int4["formats"] == {"float32": 4, "int4": 64}
    assert int4["bits"] == 64 * 4 + 4 * 32 + 4 * 32


def test_codebook_weights_count_and_store_at_their_bit_width() -> None:
    model = _half_zero_linear()
    coded = npr.compress(model, [npr.Codebook(bits=2)], measure=False).model
    assert parameter_count(coded) == 68
    summary = storage_summary(coded)
    # 64 two-bit indices + 4 biases + side tensors: 4 centroids and 4 channel scales
    assert summary["formats"] == {"float32": 4, "int2": 64}
    assert summary["bits"] == 64 * 2 + 4 * 32 + (4 + 4) * 32


def test_dynamic_int8_linear_and_embedding_weights_count() -> None:
    """DynamicQuantize keeps its int8 codes in buffers and shows a read-only float ``weight``
    (for model code that reads it): the count must still see every weight, at 8 bits."""
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 4))
    with torch.no_grad():  # +-1 everywhere: no int8 step rounds a weight to zero
        model[0].weight.copy_(torch.randn(10, 16).sign())
        model[1].weight.copy_(torch.randn(4, 16).sign())
        model[1].weight[:, :8] = 0.0
    quantize = npr.DynamicQuantize(target="generic", outlier_channels=0)
    int8 = npr.compress(model, [quantize], measure=False).model
    assert sorted(c.module for c in coded_weights(int8)) == ["0", "1"]
    # 10 x 16 table + 16 x 4 weights + 4 biases, before and after
    assert parameter_count(model) == parameter_count(int8) == 160 + 64 + 4
    assert nonzero_parameter_count(int8) == 160 + 32 + 4
    summary = storage_summary(int8)
    assert summary["formats"] == {"float32": 4, "int8": 224}
    # side tensors: 10 row scales of the table, 4 channel scales of the Linear (its
    # in_scale is empty without outlier smoothing)
    assert summary["side_bits"] == (10 + 4) * 32


def test_macs_of_pruned_and_quantized_layers() -> None:
    model = _half_zero_linear()
    x = torch.randn(1, 16)
    int8 = _weight_only(model, 8)
    # dense kernels execute all 64 MACs; skipping the 32 zero weights would leave 32
    assert count_macs(int8, x) == 64
    assert count_sparse_macs(int8, x) == count_sparse_macs(model, x) == 32
    assert macs_breakdown(int8, x) == {"dense": 64, "nonzero": 32, "coded": 64}
    assert macs_breakdown(model, x) == {"dense": 64, "nonzero": 32, "coded": 0}


def test_report_rows_show_parameters_storage_and_which_macs_run() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():  # magnitudes 1..2: no kept weight quantizes to zero
        model[1].weight.copy_(torch.randn(4, 16).sign() * (1 + torch.rand(4, 16)))
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,)))]
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.5), npr.WeightOnly(bits=8)]
    with pytest.warns(ReportWarning, match="near chance"):  # an untrained toy reference
        report = npr.compress(model, recipe, evaluate=data, latency_batch_size=2).report
    table = {row[0]: row[1:] for row in rows(report)}
    assert table["parameters"] == ("68", "68", "same")
    assert table["non-zero parameters"] == ("68", "36", "1.89× fewer")
    assert table["bits / parameter, memory"][:2] == ("32.00", f"{768 / 68:.2f}")
    assert table["  … storage formats"] == ("float32 68", "float32 4, int8 64", "")
    assert table["MACs, dense kernels"] == ("64", "64", "same")
    assert table["MACs, non-zero weights only"] == ("64", "32", "2.00× fewer")
    assert report["macs"]["executed_by_dense_kernels"] == 64
    assert "dense kernels" in report["macs"]["note"]
