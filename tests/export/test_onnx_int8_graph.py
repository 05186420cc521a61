"""Integer zero padding in exported INT8 graphs (:mod:`netpress.export.int8_graph`)."""

import numpy as np
import pytest
import torch

import netpress as npr
from netpress.export.int8_graph import integer_pads
from netpress.export.onnx import export_onnx, optimized_op_types, ort_run, ort_session
from netpress.models.cifar_resnet import cifar_resnet
from netpress.quant import Quantize

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
h, nh = onnx.helper, onnx.numpy_helper


def _qdq_pad(pad_value: float = 0.0, zp_after: int = 7, per_channel: bool = False):
    """``x → Q → DQ → Pad(channels, pad_value) → Q → DQ → y`` with the second zero point
    ``zp_after`` (7 = the same as the first)."""
    scale = np.full(3, 0.1, np.float32) if per_channel else np.array(0.1, np.float32)
    inits = [nh.from_array(scale, "s"), nh.from_array(np.array(7, np.uint8), "z"),
             nh.from_array(np.array(zp_after, np.uint8), "z2"),
             nh.from_array(np.array([0, 0, 0, 0, 0, 2, 0, 0], np.int64), "pads"),
             nh.from_array(np.array(pad_value, np.float32), "v")]
    axis = [h.make_attribute("axis", 1)] if per_channel else []
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q0"]),
             h.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
             h.make_node("Pad", ["d0", "pads", "v"], ["p"], name="the_pad"),
             h.make_node("QuantizeLinear", ["p", "s", "z2"], ["q1"]),
             h.make_node("DequantizeLinear", ["q1", "s", "z2"], ["y"])]
    for n in nodes:
        if n.op_type.endswith("Linear"):
            n.attribute.extend(axis)
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", 1, [2, 3, 4, 4])],
                         [h.make_tensor_value_info("y", 1, [2, 5, 4, 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_zero_pad_between_equal_quantizers_runs_on_the_codes():
    model = _qdq_pad()
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    before = _run(model, x)
    assert integer_pads(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "Pad", "DequantizeLinear"], ops
    np.testing.assert_array_equal(_run(model, x), before)  # exactly the same function
    assert float(np.abs(before[:, 3:]).max()) == 0.0


@pytest.mark.parametrize("kw", [{"pad_value": 1.0}, {"zp_after": 9}, {"per_channel": True}],
                         ids=["nonzero-fill", "other-zero-point", "per-channel"])
def test_pads_that_would_change_the_result_stay(kw):
    model = _qdq_pad(**kw)
    assert integer_pads(model) == 0
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 2


def test_option_a_resnet_exports_no_float_island(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet(8).eval()  # two parameter-free channel-padding shortcuts
    data = [(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    q = npr.compress(model, Quantize(range_search=False), calibration=data,
                     measure=False).model
    path = export_onnx(q, tmp_path / "r8.onnx", data[0][0][:1])
    ops = optimized_op_types(path)
    assert ops.count("Pad") >= 2 and "DequantizeLinear" not in ops, ops
    assert ops.count("QuantizeLinear") == 1, ops  # the input only
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = q(x).numpy()
    out = ort_run(ort_session(path), x)
    assert float((out.argmax(1) == ref.argmax(1)).mean()) >= 0.97
    assert float(np.abs(out - ref).max()) < 0.05 * float(np.abs(ref).max())


def test_a_layer_left_in_float_stays_float_in_onnxruntime(tmp_path):
    """Without its own per-channel DequantizeLinear, ONNX Runtime would quantize the float
    conv's weights per tensor itself and the export would not compute the fake-quant model."""
    from netpress.testing import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = [(torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)) for _ in range(4)]
    q = npr.compress(model, Quantize(ignore=("conv2",), range_search=False), calibration=data,
                     measure=False).model
    path = export_onnx(q, tmp_path / "mixed.onnx", data[0][0][:1])
    ops = optimized_op_types(path)
    assert ops.count("QLinearConv") == 1 and "Conv" in ops, ops
    proto = onnx.load(path)
    float_conv = next(n for n in proto.graph.node if n.op_type == "Conv" and
                      not n.input[1].endswith("DequantizeLinear_output_0"))
    dq = next(n for n in proto.graph.node if float_conv.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear" and dq.attribute[0].i == 1
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        ref = q(x).numpy()
    out = ort_run(ort_session(path), x)
    assert float(np.abs(out - ref).max()) < 1e-3 * float(np.abs(ref).max()) + 1e-5


def test_a_float_gemm_read_from_dequantized_codes_stays_float():
    from netpress.export.int8_graph import keep_float_layers

    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 6)).astype(np.float32)
    inits = [nh.from_array(np.array(0.05, np.float32), "s"),
             nh.from_array(np.array(128, np.uint8), "z"), nh.from_array(w, "w"),
             nh.from_array(np.ones(5, np.float32), "b")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("Gemm", ["d", "w", "b"], ["g"], transB=1),
             h.make_node("QuantizeLinear", ["g", "s", "z"], ["q2"]),
             h.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", 1, [4, 6])],
                         [h.make_tensor_value_info("y", 1, [4, 5])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    assert keep_float_layers(model) == 1
    onnx.checker.check_model(model, full_check=True)
    own = next(n for n in model.graph.node if n.output[0] == model.graph.node[3].input[0])
    assert own.op_type == "DequantizeLinear" and own.attribute[0].i == 1
    x = rng.normal(size=(4, 6)).astype(np.float32)
    d = (np.clip(np.round(x / 0.05) + 128, 0, 255) - 128) * 0.05
    ref = (np.clip(np.round((d @ w.T + 1) / 0.05) + 128, 0, 255) - 128) * 0.05
    np.testing.assert_allclose(_run(model, x), ref, atol=1e-6)  # float Gemm, not QGemm
