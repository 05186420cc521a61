"""GPTQ's group-quantized Linear layers exported as ONNX Runtime's MatMulNBits (or the
DequantizeLinear + MatMul fallback): packing maths against brute force, ORT against the
fake-quant model, file size."""

import onnx
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError
from netpress.export import nbits
from netpress.export.nbits import (
    NBitsFallbackWarning,
    nbits_block_size,
    nbits_weights,
    pack_codes,
    unpack_codes,
)
from netpress.export.onnx import export_onnx, optimized_op_types, ort_run, ort_session
from netpress.reconstruct.modules import GroupQuantLinear

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_and_low_bits_first(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 37), generator=g, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-37 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 37), codes.to(torch.uint8))
    first = pack_codes(torch.tensor([[1, 2, 3, 0]]), bits)[0, 0]
    assert int(first) & ((1 << bits) - 1) == 1  # the first code in the low bits
    if bits == 4:
        assert int(first) == 0x21


def test_block_size_choice():
    assert nbits_block_size(384, 128) == 128
    assert nbits_block_size(384, 48) == 16
    assert nbits_block_size(1024, 256) == 128  # a group spans two blocks
    assert nbits_block_size(384, 24) is None
    assert nbits_block_size(100, 100) == 128 and nbits_block_size(40, 64) == 64


def _random_layer(k: int, n: int, bits: int, group: int, symmetric: bool) -> GroupQuantLinear:
    g = torch.Generator().manual_seed(k + group)
    layer = GroupQuantLinear(k, n, True, bits, group, symmetric)
    lo, hi = (-(1 << (bits - 1)) + 1, 1 << (bits - 1)) if symmetric else (0, 1 << bits)
    codes = torch.randint(lo, hi, (n, k), generator=g)
    groups = layer.weight_scale.shape[1]
    zero = None if symmetric else torch.randint(0, 1 << bits, (n, groups), generator=g)
    layer.set_codes(codes, torch.rand(n, groups, generator=g).half() + 0.01, zero)
    torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize(("k", "group", "symmetric", "bits"), [
    (256, 128, False, 4), (256, 128, True, 4), (100, 32, False, 4), (96, 48, True, 4),
    (100, 100, False, 4), (64, 32, False, 8), (64, 16, True, 2)])
def test_nbits_weights_dequantize_like_the_layer(k, group, symmetric, bits):
    layer = _random_layer(k, 6, bits, group, symmetric)
    block = nbits_block_size(k, group)
    w = nbits_weights(layer.weight_q, layer.weight_scale, layer.weight_zero, bits=bits,
                      group_size=group, block_size=block)
    codes = unpack_codes(w.packed, bits, block).reshape(6, -1)[:, :k].float()
    zp = torch.full_like(w.scales, 1 << (bits - 1)) if w.zero_points is None \
        else unpack_codes(w.zero_points, bits, w.scales.shape[1]).float()
    per_col = torch.arange(k) // block  # brute force, column by column
    deq = (codes - zp[:, per_col]) * w.scales[:, per_col]
    assert torch.equal(deq, layer.dequantized_weight())


def _gptq_model(k: int = 256, group: int | None = 128, symmetric: bool = False,
                bits: int = 4) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, 384), nn.GELU(), nn.Linear(384, 64))
    x = torch.randn(48, 7, k)
    calib = [(x[i:i + 16], None) for i in range(0, 48, 16)]
    q = npr.compress(model, [npr.GPTQ(bits=bits, group_size=group, symmetric=symmetric)],
                     calibration=calib, measure=False).model
    return model, q, x


def _initializer_bytes(path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


@pytest.mark.parametrize(("k", "group", "symmetric"),
                         [(256, 128, False), (256, 128, True), (100, None, False)])
def test_matmulnbits_export_matches_fake_quant_and_is_small(tmp_path, k, group, symmetric):
    model, q, x = _gptq_model(k, group, symmetric)
    path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    assert optimized_op_types(path).count("MatMulNBits") == 2
    ours = torch.from_numpy(ort_run(ort_session(path), x))
    with torch.no_grad():
        ref = q(x)
    assert float((ours - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", x[:1])
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    ratio = (weights * 4) / (_initializer_bytes(path) - (384 + 64) * 4)  # weights, not biases
    assert ratio >= 5, f"4-bit weights only {ratio:.2f}x smaller than FP32"
    assert fp32.stat().st_size / path.stat().st_size >= 5


def test_int8_accuracy_level_stays_close(tmp_path):
    _, q, x = _gptq_model()
    path = export_onnx(q, tmp_path / "q.onnx", x[:1], nbits_accuracy=4)
    ours = torch.from_numpy(ort_run(ort_session(path), x)).flatten(0, 1)
    with torch.no_grad():
        ref = q(x).flatten(0, 1)
    assert float(torch.nn.functional.cosine_similarity(ours, ref).min()) > 0.999


def test_fallback_dequantize_linear(tmp_path, monkeypatch):
    _, q, x = _gptq_model(symmetric=True)
    with torch.no_grad():
        ref = q(x)
    monkeypatch.setattr(nbits, "matmulnbits_available", lambda bits, block: "not in this ORT")
    with pytest.warns(NBitsFallbackWarning,
                      match=r"2 group-quantized layer\(s\) \('0', '2'\).*not in this ORT"):
        path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    ops = optimized_op_types(path)
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") == 2
    ours = torch.from_numpy(ort_run(ort_session(path), x))
    assert float((ours - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    with pytest.raises(ModelError, match="layer '0' cannot be MatMulNBits"):
        export_onnx(q, tmp_path / "r.onnx", x[:1], nbits="matmulnbits")
    with pytest.raises(ModelError, match="nbits='int4'"):
        export_onnx(q, tmp_path / "r.onnx", x[:1], nbits="int4")


def test_bits_without_kernel_fall_back(tmp_path):
    _, q, x = _gptq_model(bits=3, group=32)
    with pytest.warns(NBitsFallbackWarning, match="bits in"):
        path = export_onnx(q, tmp_path / "q.onnx", x[:1])
    ours = torch.from_numpy(ort_run(ort_session(path), x))
    with torch.no_grad():
        ref = q(x)
    assert float((ours - ref).abs().max()) < 1e-4 * float(ref.abs().max())
