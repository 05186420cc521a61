"""A quantized model measured as deployed: exported to ONNX, run by ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import netpress as npr
from netpress.measure import compare
from netpress.measure.deployed import float_twin, is_quantized, onnx_section
from netpress.report.rows import notes, rows
from netpress.testing import TinyCNN

pytest.importorskip("onnxruntime")


def _data(n: int = 48, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(n // 16)]


@pytest.fixture(scope="module")
def int8_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    result = npr.compress(model, [npr.Quantize()], calibration=_data(), measure=False)
    return result.reference, result.model


def test_is_quantized_and_float_twin(int8_pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    reference, int8 = int8_pair
    assert is_quantized(int8) and not is_quantized(reference)
    twin = float_twin(int8)
    assert not is_quantized(twin)
    assert npr.measure.parameter_count(twin) == npr.measure.parameter_count(int8)
    weight_only = npr.compress(reference, [npr.WeightOnly(bits=8)], measure=False).model
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():  # without activation quantizers the twin computes the same thing
        torch.testing.assert_close(float_twin(weight_only)(x), weight_only(x))


def test_exported_agreement_is_measured_in_onnxruntime(
        int8_pair: tuple[torch.nn.Module, torch.nn.Module], tmp_path: Path) -> None:
    from netpress.export.onnx import OrtModule, export_onnx

    reference, int8 = int8_pair
    data = _data(seed=1)
    x = data[0][0][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compare(reference, int8, data=data, latency_batch_sizes=(1, 4),
                         latency_repeats=4)
    onnx = report["onnx"]
    # by hand: the same export run through ONNX Runtime, against the eager reference
    ort = OrtModule(export_onnx(int8, tmp_path / "m.onnx", x))
    with torch.no_grad():
        ref_top = torch.cat([reference(b) for b, _ in data]).argmax(1)
        ort_top = torch.cat([ort(b) for b, _ in data]).argmax(1)
    assert onnx["fidelity"]["agreement"] == pytest.approx(float((ref_top == ort_top).double()
                                                               .mean()))
    assert onnx["fidelity"]["n"] == 48
    assert onnx["latency"]["runtime"] == "onnxruntime" and report["latency"]["runtime"] == "eager"
    assert onnx["latency"]["reference_ms"] > 0 and onnx["latency"]["compressed_ms"] > 0
    labels = [row[0] for row in rows(report)]
    assert "latency eager, batch 1" in labels and "latency ONNX Runtime, batch 1" in labels
    assert "latency ONNX Runtime, batch 4" in labels
    assert labels.count("  … exported, in ONNX Runtime") == 2  # accuracy and agreement
    assert any("fake quantization in eager PyTorch" in n for n in notes(report))


def test_float_models_have_no_onnx_section_and_skips_are_explained(
        int8_pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    reference, int8 = int8_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = compare(reference, reference, data=_data(16), latency_batch_sizes=())
    assert plain["onnx"] is None
    skipped = onnx_section(reference, int8, {"x": [1, 2]})
    assert skipped == {"skipped": "ONNX export takes a tensor, a tuple of tensors or a dict of "
                                  "tensors as inputs"}
    assert any("skipped: ONNX export takes" in n
               for n in notes({"onnx": skipped, "latency": None}))
    failed = onnx_section(reference, int8, torch.randn(1, 3, 8, 8), batch_sizes=())
    assert failed["error"].startswith("ONNX export or ONNX Runtime failed: ")
