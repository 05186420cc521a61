"""Copies of one weight (transposed, or reshaped) are written once (export/_tied.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from netpress.export._tied import MIN_ELEMENTS, share_copies


def _model(w: np.ndarray, wt: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(wt, "WT")]
    nodes = [helper.make_node("Gather", ["W", "ids"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "WT"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", 7, [None])],
                              [helper.make_tensor_value_info("y", 1, [None, w.shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_transposed_copy_becomes_a_transpose_node_and_runs_the_same():
    ort = pytest.importorskip("onnxruntime")
    w = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    model = _model(w, np.ascontiguousarray(w.T))
    ids = np.array([3, 0, 127])
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    assert share_copies(model) == 1
    assert len(model.graph.initializer) == 1  # one of the two, the other its Transpose
    assert model.graph.node[0].op_type == "Transpose"
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    assert np.array_equal(before, after)


def test_near_copies_and_small_tensors_are_left_alone():
    w = np.random.default_rng(1).standard_normal((128, 64)).astype(np.float32)
    other = np.ascontiguousarray(w.T).copy()
    other[5, 7] += 1e-3
    assert share_copies(_model(w, other)) == 0
    small = np.ones((8, 8), dtype=np.float32) * torch.arange(8).numpy()[:, None]
    assert small.size < MIN_ELEMENTS
    assert share_copies(_model(small, np.ascontiguousarray(small.T))) == 0


def test_the_same_bytes_in_another_shape_become_a_reshape_node():
    ort = pytest.importorskip("onnxruntime")
    a = np.random.default_rng(2).integers(0, 255, (256, 32)).astype(np.uint8)
    inits = [numpy_helper.from_array(a, "data"),
             numpy_helper.from_array(a.reshape(256, 4, 8).copy(), "packed")]
    nodes = [helper.make_node("Gather", ["data", "ids"], ["rows"], axis=0),
             helper.make_node("Gather", ["packed", "ids"], ["blocks"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", 7, [None])],
                              [helper.make_tensor_value_info("rows", 2, [None, 32]),
                               helper.make_tensor_value_info("blocks", 2, [None, 4, 8])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ids = np.array([5, 255, 0])
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})
    assert share_copies(model) == 1
    assert [i.name for i in model.graph.initializer] == ["data", "packed/shared_shape"]
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
