"""Dynamic INT8 (DynamicQuantize): the maths against brute force and ONNX Runtime's own ops,
the export's integer kernels, the target rules, outlier smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError
from netpress.quant.dynamic import (
    DynamicQuantLinear,
    QuantEmbedding,
    dynamic_linear,
    dynamic_qparams,
    int8_row_codes,
    int8_weight_codes,
    outlier_scale,
    quantize_activation,
)
from netpress.quant.target import exact_on


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _ort_dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(x.shape)),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, s, z = sess.run(None, {"x": x})
    onnx.checker.check_model(model)
    return y, float(s), int(z)


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_activation_codes_match_onnx_runtime(shift):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7) * 2 + shift
    q, s, z = quantize_activation(x)
    ref_q, ref_s, ref_z = _ort_dynamic_quantize(x.numpy())
    assert float(s) == pytest.approx(ref_s, rel=1e-6) and int(z) == ref_z
    assert (q.numpy().astype(np.int64) != ref_q.astype(np.int64)).sum() == 0


def test_qparams_definition_and_zero_tensor():
    x = torch.tensor([-1.0, 0.5, 2.0])
    s, z = dynamic_qparams(x)
    assert float(s) == pytest.approx(3.0 / 255) and float(z) == round(1.0 / (3.0 / 255))
    s0, z0 = dynamic_qparams(torch.zeros(4))
    assert float(s0) == 1.0 and float(z0) == 0.0


def test_dynamic_linear_is_the_integer_product():
    torch.manual_seed(1)
    x, w, b = torch.randn(4, 6, 16), torch.randn(5, 16), torch.randn(5)
    codes, ws = int8_weight_codes(w, "x86-vnni")
    y = dynamic_linear(x, codes, ws, b)
    q, s, z = quantize_activation(x)
    acc = (q.long() - int(z)) @ codes.long().T  # brute force in int64
    brute = acc.double() * (float(s) * ws.double()) + b.double()
    torch.testing.assert_close(y.double(), brute, rtol=1e-6, atol=1e-5)
    assert _sqnr(x @ w.T + b, y) > 30


def test_weight_codes_obey_the_avx2_rule():
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    w[:, ::2] *= 3  # adjacent pairs of large same-sign weights
    codes, scale = int8_weight_codes(w, "x86-avx2")
    assert exact_on("x86-avx2", codes)
    assert _sqnr(w, codes.float() * scale[:, None]) > 25
    full, _ = int8_weight_codes(w, "x86-vnni")
    assert int(full.abs().max()) == 127


def test_embedding_rows_and_errors():
    torch.manual_seed(3)
    emb = nn.Embedding(50, 12, padding_idx=0)
    q = QuantEmbedding.from_float(emb)
    ids = torch.randint(0, 50, (2, 9))
    assert _sqnr(emb(ids), q(ids)) > 35
    codes, scale = int8_row_codes(emb.weight)
    assert codes.dtype == torch.int8 and scale.shape == (50,)
    with pytest.raises(ModelError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(5, 3, max_norm=1.0))


def test_outlier_scale_shrinks_the_range():
    amax = torch.tensor([1.0, 20.0, 2.0, 10.0, 1.5])
    f = outlier_scale(amax, 2, 1.5)
    assert f is not None
    torch.testing.assert_close(f, torch.tensor([1.0, 0.1, 1.0, 0.2, 1.0]))
    assert float((amax * f).max()) == pytest.approx(2.0)
    assert outlier_scale(amax, 2, 20.0) is None and outlier_scale(amax, 0, 1.5) is None


def test_smoothing_outlier_channels_is_more_faithful():
    torch.manual_seed(4)
    lin = nn.Linear(32, 8)
    x = torch.randn(64, 32)
    x[:, 3] *= 40  # one outlier channel
    plain = DynamicQuantLinear.from_float(lin, "x86-vnni")
    f = outlier_scale(x.abs().amax(0), 1, 1.5)
    smooth = DynamicQuantLinear.from_float(lin, "x86-vnni", f)
    with torch.no_grad():
        ref = lin(x)
        assert _sqnr(ref, smooth(x)) > _sqnr(ref, plain(x)) + 5


class _TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(input_ids))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 40, (4, 10), generator=g), torch.zeros(4)) for _ in range(3)]


def test_compress_export_runs_integer_kernels_in_onnx_runtime(tmp_path):
    from netpress.export.onnx import OrtModule, optimized_op_types

    torch.manual_seed(5)
    model = _TextModel().eval()
    data = _data()
    x = data[0][0]
    res = npr.compress(model, [npr.DynamicQuantize(target="generic")], calibration=data,
                       example_inputs=x, measure=False)
    q = res.model
    assert isinstance(model.up, nn.Linear)  # the input model is untouched
    assert isinstance(q.up, DynamicQuantLinear) and isinstance(q.emb, QuantEmbedding)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert _sqnr(ref, out) > 25
    path = npr.export_onnx(q, tmp_path / "dyn.onnx", x)
    ops = set(optimized_op_types(path))
    assert ops & {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}, ops
    ort_out = OrtModule(path)(x)
    torch.testing.assert_close(ort_out, out, rtol=1e-3, atol=1e-3)
    import onnx

    int8 = sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer
               if t.data_type == onnx.TensorProto.INT8)
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (nn.Linear, nn.Embedding)))
    assert int8 == weights  # every weight matrix and table is stored as int8


def test_config_and_model_errors():
    with pytest.raises(RecipeError, match="outlier_channels"):
        npr.DynamicQuantize(outlier_channels=-1)
    with pytest.raises(RecipeError, match="target"):
        npr.DynamicQuantize(target="cray")
    with pytest.raises(RecipeError, match="outlier_gain"):
        npr.DynamicQuantize(outlier_gain=0.5)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ModelError, match="no float nn.Linear"):
        npr.compress(conv, [npr.DynamicQuantize(outlier_channels=0)],
                     example_inputs=torch.randn(1, 1, 5, 5), measure=False)
