"""QDQ ONNX export: ONNX Runtime agrees with the fake-quant model and runs integer kernels."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import netpress as npr
from netpress.datasets import digits
from netpress.demo import train_classifier
from netpress.errors import ModelError
from netpress.export.onnx import (
    export_artefact,
    export_onnx,
    optimized_op_types,
    ort_latency,
    ort_run,
    ort_session,
)
from netpress.models.small import DigitsCNN
from netpress.quant import Codebook, Quantize, WeightOnly
from netpress.quant.emulate import emulated_kernels
from netpress.quant.modules import ActQuant, QuantWeight
from netpress.quant.saturation import kernel_rows, saturating_pairs
from netpress.quant.target import TargetMismatchWarning
from netpress.testing import TinyCNN, TinyResNet

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits_cnn():
    train, test = digits()
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), DataLoader(train, batch_size=64, shuffle=True),
                             epochs=2)
    x = torch.cat([train.tensors[0], test.tensors[0]])
    calib = [(train.tensors[0][i:i + 64], train.tensors[1][i:i + 64]) for i in range(0, 320, 64)]
    return model, x, test, calib


def test_fake_quant_and_onnxruntime_agree(digits_cnn, tmp_path):
    model, x, test, calib = digits_cnn
    result = npr.compress(model, Quantize(), calibration=calib, measure=False)
    path = export_onnx(result.model, tmp_path / "q.onnx", x[:1])
    ort_out = ort_run(ort_session(path), x)
    with torch.no_grad():
        torch_out = result.model(x).numpy()
        float_out = model(x)
    agree = float((ort_out.argmax(1) == torch_out.argmax(1)).mean())
    assert agree >= 0.995, f"fake-quant vs ONNX Runtime agreement {agree:.4f}"
    scale = np.abs(torch_out).max()
    assert float(np.abs(ort_out - torch_out).max()) < 0.02 * scale
    # the quantized classifier is still the trained classifier
    accuracy = float((float_out[-len(test):].argmax(1) == test.tensors[1]).float().mean())
    assert accuracy > 0.9
    assert float((float_out.argmax(1).numpy() == ort_out.argmax(1)).mean()) > 0.98


def test_qat_model_and_onnxruntime_agree(digits_cnn, tmp_path):
    """A QAT-trained model (input grid kept lossless) exports to what its fake-quant computes."""
    from netpress.quant.input_grid import lattice_quantizers
    from netpress.quant.qat import QAT

    model, x, _, calib = digits_cnn
    q = npr.compress(model, QAT(max_steps=10, lr=1e-5, alpha=1.0), calibration=calib,
                     train=calib, measure=False).model
    path = export_onnx(q, tmp_path / "qat.onnx", x[:1])
    ort_out = ort_run(ort_session(path), x)
    with torch.no_grad():
        torch_out = q(x).numpy()
    agree = float((ort_out.argmax(1) == torch_out.argmax(1)).mean())
    assert agree >= 0.995, f"fake-quant vs ONNX Runtime agreement {agree:.4f}"
    assert float(np.abs(ort_out - torch_out).max()) < 0.02 * np.abs(torch_out).max()
    (grid,) = lattice_quantizers(q)  # the digits are 8-bit: the input grid applies
    assert float(q.get_submodule(grid).scale) == 1.0


def test_onnxruntime_runs_integer_kernels(digits_cnn, tmp_path):
    model, x, _, calib = digits_cnn
    q = npr.compress(model, Quantize(), calibration=calib, measure=False).model
    path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    ops = optimized_op_types(path)
    # both Linear layers (the classifier too: its bias exports as int32 codes) run as QGemm
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2, ops
    assert "Conv" not in ops and "Relu" not in ops and "Gemm" not in ops
    import onnx

    proto = onnx.load(path)
    weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 4  # two convs and two linear layers, stored as int8
    zps = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps  # activations as uint8 Q/DQ pairs
    float_path = export_onnx(model, tmp_path / "f.onnx", x[:1])
    assert "QLinearConv" not in optimized_op_types(float_path)
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(ort_session(float_path), x), model(x).numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_residual_model_fuses_add(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    data = [(torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)) for _ in range(4)]
    q = npr.compress(model, Quantize(), calibration=data, measure=False).model
    path = export_onnx(q, tmp_path / "r.onnx", data[0][0][:1])
    ops = optimized_op_types(path)
    assert ops.count("QLinearConv") == 3 and "QLinearAdd" in ops, ops
    assert "QGemm" in ops and "Gemm" not in ops, ops
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(ort_session(path), x), q(x).numpy(), atol=0.05)


def test_export_refuses_calibrating_models_and_bad_inputs(tmp_path):
    aq = ActQuant()
    from netpress.quant.observers import MinMaxObserver

    aq.observer = MinMaxObserver()
    with pytest.raises(ModelError, match="still calibrating"):
        export_onnx(torch.nn.Sequential(aq), tmp_path / "x.onnx", torch.randn(1, 3))
    with pytest.raises(ModelError, match="example_inputs"):
        export_onnx(TinyCNN(), tmp_path / "x.onnx", {"x": "not a tensor"})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), target, torch.randn(1, 2))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_ort_latency_reports_each_batch_size(digits_cnn, tmp_path):
    model, x, _, _ = digits_cnn
    path = export_onnx(model, tmp_path / "f.onnx", x[:1])
    stats = ort_latency(path, x[:1], threads=1, batch_sizes=(1, 8), warmup=1, repeats=3)
    assert set(stats) == {1, 8}
    assert all(s["median_ms"] > 0 and s["throughput"] > 0 for s in stats.values())


@pytest.mark.parametrize("cfg", [WeightOnly(bits=4), Codebook(bits=3)], ids=["w4", "cb3"])
def test_weight_only_models_export(cfg, tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    q = npr.compress(model, cfg, measure=False).model
    x = torch.randn(16, 1, 8, 8)
    path = export_onnx(q, tmp_path / "w.onnx", x[:1])
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(ort_session(path), x), q(x).numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_export_artefact_from_npress_file(digits_cnn, tmp_path):
    model, x, _, calib = digits_cnn
    result = npr.compress(model, Quantize(), calibration=calib, measure=False)
    result.save(tmp_path / "m.npress")
    path = export_artefact(tmp_path / "m.npress", tmp_path / "m.onnx", (1, 1, 8, 8))
    ops = optimized_op_types(path)
    assert "QLinearConv" in ops and "QGemm" in ops and "Gemm" not in ops, ops
    with torch.no_grad():
        same = ort_run(ort_session(path), x).argmax(1) == result.model(x).numpy().argmax(1)
    assert float(same.mean()) >= 0.995
    with pytest.raises(ModelError, match="input shape"):
        export_artefact(tmp_path / "m.npress", tmp_path / "n.onnx", (0, 8))


def test_saturating_target_exports_a_model_every_cpu_computes_exactly(digits_cnn, tmp_path):
    """Forced x86-avx2 target: no weight pair can saturate, the emulated AVX2 kernels compute
    what the fake-quant model computes, and ONNX Runtime here agrees with it."""
    model, x, _, calib = digits_cnn
    q = npr.compress(model, Quantize(target="x86-avx2"), calibration=calib,
                     measure=False).model
    layers = [m for m in q.modules() if isinstance(m, QuantWeight)]
    assert layers and all(m.target == "x86-avx2" for m in layers)
    assert not any(saturating_pairs(kernel_rows(m.weight_q)).any() for m in layers)
    with torch.no_grad():
        torch_out = q(x)
        with emulated_kernels(q, "x86-avx2"):
            avx2_out = q(x[:400])
        with emulated_kernels(q, "x86-vnni"):
            exact_out = q(x[:400])
    assert torch.equal(avx2_out, exact_out)  # not one sum saturates
    assert float((avx2_out.argmax(1) == torch_out[:400].argmax(1)).float().mean()) >= 0.995
    path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    import onnx

    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["netpress.int8_target"] == "x86-avx2"
    assert meta["netpress.int8_exact_on"] == "x86-vnni,x86-avx2,arm64"
    ort_out = ort_run(ort_session(path), x)
    agree = float((ort_out.argmax(1) == torch_out.numpy().argmax(1)).mean())
    assert agree >= 0.995, f"fake-quant vs ONNX Runtime agreement {agree:.4f}"


def test_export_and_sessions_warn_on_a_cpu_that_would_change_predictions(digits_cnn, tmp_path,
                                                                         monkeypatch):
    model, x, _, calib = digits_cnn
    vnni = npr.compress(model, Quantize(target="x86-vnni"), calibration=calib,
                        measure=False)
    assert any(saturating_pairs(kernel_rows(m.weight_q)).any()
               for m in vnni.model.modules() if isinstance(m, QuantWeight))
    with torch.no_grad():
        fake = vnni.model(x[:200])
        with emulated_kernels(vnni.model, "x86-avx2"):
            emulated = vnni.model(x[:200])  # what an AVX2 machine computes with this model
    assert float((emulated - fake).abs().max()) > 0.01
    path = export_onnx(vnni.model, tmp_path / "vnni.onnx", x[:1])  # the real host: silent?
    monkeypatch.setattr("netpress.quant.target.host_target", lambda: "x86-avx2")
    with pytest.warns(TargetMismatchWarning, match="'x86-vnni'.*'x86-avx2'.*saturate"):
        export_onnx(vnni.model, tmp_path / "again.onnx", x[:1])
    with pytest.warns(TargetMismatchWarning, match="vnni.onnx"):
        ort_session(path)
    vnni.save(tmp_path / "m.npress")  # the target travels in the artefact
    with pytest.warns(TargetMismatchWarning, match="'x86-vnni'"):
        export_artefact(tmp_path / "m.npress", tmp_path / "m.onnx", (1, 1, 8, 8))
    safe = npr.compress(model, Quantize(target="x86-avx2"), calibration=calib, measure=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetMismatchWarning)
        ort_session(export_onnx(safe.model, tmp_path / "safe.onnx", x[:1]))
