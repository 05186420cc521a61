"""INT8 graph tidy-ups after export: integer zero padding, and float layers kept float.

ONNX Runtime fuses ``DequantizeLinear → op → QuantizeLinear`` into an integer kernel only for
the ops it has QDQ rules for. A constant zero ``Pad`` between two quantizers with the same
scale and zero point (the channel padding of a ResNet's parameter-free shortcut, CIFAR
"option A") is not one of them: it stays a float island, dequantizing a whole feature map,
padding it in float and quantizing it again (about 3% of ResNet-20's INT8 run at batch 64).

Padding with ``0.0`` and quantizing is the same as padding the codes with the zero point:
``Q(pad(DQ(q), 0)) = pad(q, z)`` exactly, because ``Q(DQ(q)) = q`` and ``Q(0.0) = z``.
:func:`integer_pads` rewrites each such triple into one ``Pad`` of the uint8/int8 codes. It
is a pure function of the ONNX graph (``onnx`` is imported by the caller).

A layer left in float (``Quantize(ignore=...)``) whose input is a quantized activation reads
``DequantizeLinear(codes)``. ONNX Runtime (1.2x's ``WeightBiasQuantization``) then quantizes
its float weights itself, per tensor, and runs it as an integer kernel: the deployed model no
longer computes what the fake-quant model computes, and mixed precision silently is not.
:func:`keep_float_layers` gives each such layer its own ``DequantizeLinear`` with the same
scale and zero point written per channel (``axis=1``): the same values, which ONNX Runtime
neither quantizes the weights behind nor fuses into an integer kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["integer_pads", "keep_float_layers"]


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """The value of every initializer and ``Constant`` node output of ``graph``."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and \
                node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _same(values: dict[str, np.ndarray], a: str, b: str) -> bool:
    """Whether tensors ``a`` and ``b`` are known constants with equal values."""
    if a == b:
        return a in values
    return a in values and b in values and values[a].dtype == values[b].dtype and \
        values[a].shape == values[b].shape and bool(np.array_equal(values[a], values[b]))


def _zero_pad_value(values: dict[str, np.ndarray], pad: Any) -> bool:
    """Whether ``pad`` is a constant-mode Pad whose fill value is zero."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return False
    if len(pad.input) < 3 or not pad.input[2]:
        return True
    value = values.get(pad.input[2])
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0


def _consumers(graph: Any, name: str) -> list[Any]:
    return [n for n in graph.node if name in n.input]


def integer_pads(model: Any) -> int:
    """Rewrite ``DequantizeLinear → Pad(0) → QuantizeLinear`` with equal quantization
    parameters (per tensor) into ``Pad(codes, zero point)`` in ``model`` (an
    ``onnx.ModelProto``, changed in place); the number of pads rewritten."""
    from onnx import numpy_helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    done = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        values = _constants(graph)
        dq = next((n for n in graph.node if pad.input[0] in n.output), None)
        after = _consumers(graph, pad.output[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or \
                pad.output[0] in outputs:
            continue
        q = after[0]
        if q.op_type != "QuantizeLinear" or len(dq.input) < 3 or len(q.input) < 3 or \
                not _zero_pad_value(values, pad):
            continue
        if not (_same(values, dq.input[1], q.input[1]) and _same(values, dq.input[2],
                                                                 q.input[2])):
            continue
        if values[q.input[1]].size != 1:  # per-tensor only: a pad may add channels
            continue
        fill = f"{pad.name or pad.output[0]}_zero_point"
        graph.initializer.append(numpy_helper.from_array(
            values[q.input[2]].reshape(()).copy(), fill))
        old_out = pad.output[0]
        while len(pad.input) < 3:
            pad.input.append("")
        pad.input[0], pad.input[2] = dq.input[0], fill
        pad.output[0] = q.output[0]
        graph.node.remove(q)
        if not _consumers(graph, dq.output[0]) and dq.output[0] not in outputs:
            graph.node.remove(dq)
        for info in [v for v in graph.value_info if v.name == old_out]:
            graph.value_info.remove(info)
        done += 1
    return done


_FLOAT_LAYERS = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: Any, weight: np.ndarray) -> int | None:
    """How many channels (axis 1) the input of a Conv / ConvTranspose / Gemm ``node`` has."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gemm":
        if "transA" in attrs and attrs["transA"].i:
            return None
        return int(weight.shape[1] if "transB" in attrs and attrs["transB"].i else
                   weight.shape[0])
    group = int(attrs["group"].i) if "group" in attrs else 1
    return int(weight.shape[0] if node.op_type == "ConvTranspose" else
               weight.shape[1] * group)


def keep_float_layers(model: Any) -> int:
    """Give each float Conv / ConvTranspose / Gemm read from a per-tensor
    ``DequantizeLinear`` its own per-channel one (same values), so ONNX Runtime keeps the
    layer in float; ``model`` (an ``onnx.ModelProto``) changes in place. Returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    values = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    done = 0
    for node in [n for n in graph.node if n.op_type in _FLOAT_LAYERS]:
        dq = producer.get(node.input[0])
        weight = values.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or weight is None or \
                weight.dtype.kind != "f" or len(dq.input) < 3 or \
                values.get(dq.input[1], np.zeros(2)).size != 1 or dq.input[2] not in values:
            continue
        channels = _input_channels(node, weight)
        if channels is None:
            continue
        base = f"{node.name or node.output[0]}_float_input"
        scale, zp = values[dq.input[1]].reshape(()), values[dq.input[2]].reshape(())
        graph.initializer.extend([
            numpy_helper.from_array(np.full(channels, scale, scale.dtype), f"{base}_scale"),
            numpy_helper.from_array(np.full(channels, zp, zp.dtype), f"{base}_zero_point")])
        own = helper.make_node("DequantizeLinear", [dq.input[0], f"{base}_scale",
                                                    f"{base}_zero_point"], [base],
                               name=base, axis=1)
        graph.node.insert(list(graph.node).index(node), own)
        node.input[0] = base
        done += 1
    return done
