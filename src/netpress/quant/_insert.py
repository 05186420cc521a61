"""Where activation quantizers go in a traced graph (the placement ONNX Runtime fuses best).

An :class:`~netpress.quant.modules.ActQuant` follows:

* every model input that reaches a quantized layer (an input read only by layers left in
  float stays float: rounding it would only add noise), and every input of a quantized layer
  that is not already quantized;
* the outputs of quantized layers, additions, concatenations and average pools, unless
  their only users are ReLUs: then it follows the ReLU instead (with an unsigned range
  starting at 0 the ReLU is absorbed by the quantizer, as ONNX Runtime's ReluQuantFusion
  does, so Conv+ReLU becomes one integer convolution);
* the outputs of additions, concatenations and average pools (and of a ReLU after one) only
  when they reach a quantized layer: a head left in float (say ``ignore=("fc",)``) then
  reads the float pool of the last integer layer's output, not a rounded one;
* pass-through ops (reshape, flatten, slicing, max pooling, zero padding) **share** the
  quantizer of their input, so the integer runtime can run them on integers unchanged.

The graph's outputs stay float (no quantizer on the logits) unless ``quantize_output``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from netpress.quant.modules import ActQuant

__all__ = ["drop_identities", "insert_act_quant", "remove_unused", "feeding_quant"]

_RELU_FNS: set[object] = {F.relu, torch.relu, F.relu6}
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_COMPUTE_FNS: set[object] = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat,
                             F.avg_pool2d, F.adaptive_avg_pool2d, F.avg_pool1d,
                             F.adaptive_avg_pool1d, torch.mean}
_COMPUTE_METHODS = {"add", "mean"}
_COMPUTE_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_PASS_FNS: set[object] = {torch.flatten, torch.reshape, operator.getitem, F.max_pool2d,
                          F.max_pool1d, F.pad, torch.squeeze, torch.unsqueeze, F.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute",
                 "transpose"}
_PASS_MODULES = (nn.Flatten, nn.MaxPool2d, nn.MaxPool1d, nn.Identity, nn.Dropout, nn.Unflatten)


def _kind(gm: fx.GraphModule, node: fx.Node, is_layer: Callable[[str], bool]) -> str:
    """One of ``relu``, ``compute``, ``pass``, ``layer``, ``other``."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if is_layer(str(node.target)):
            return "layer"
        if isinstance(m, _RELU_MODULES):
            return "relu"
        if isinstance(m, _COMPUTE_MODULES):
            return "compute"
        return "pass" if isinstance(m, _PASS_MODULES) else "other"
    if node.op == "call_function":
        if node.target in _RELU_FNS:
            return "relu"
        if node.target is F.pad and node.kwargs.get("mode", "constant") != "constant":
            return "other"
        if node.target in _COMPUTE_FNS:
            return "compute"
        return "pass" if node.target in _PASS_FNS else "other"
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in _COMPUTE_METHODS:
            return "compute"
        return "pass" if node.target in _PASS_METHODS else "other"
    return "input" if node.op == "placeholder" else "other"


def _feeds_layer(gm: fx.GraphModule, node: fx.Node, is_layer: Callable[[str], bool]) -> bool:
    """Whether ``node``'s value reaches a quantized layer through pass, ReLU and compute ops."""
    for user in node.users:
        kind = _kind(gm, user, is_layer)
        if kind == "layer" or (kind in ("pass", "relu", "compute")
                               and _feeds_layer(gm, user, is_layer)):
            return True
    return False


def _after_compute(gm: fx.GraphModule, node: fx.Node, kind: str,
                   is_layer: Callable[[str], bool]) -> bool:
    """A compute op, or a ReLU of one (whose output quantizer is optional)."""
    if kind == "relu":
        src = node.args[0] if node.args else None
        return isinstance(src, fx.Node) and _kind(gm, src, is_layer) == "compute"
    return kind == "compute"


def _attach(gm: fx.GraphModule, node: fx.Node, name: str) -> fx.Node:
    with gm.graph.inserting_after(node):
        q = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    return q


def drop_identities(gm: fx.GraphModule) -> int:
    """Remove calls of ``nn.Identity`` (e.g. folded BatchNorms) from ``gm``; how many."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   nn.Identity):
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            dropped += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return dropped


def insert_act_quant(gm: fx.GraphModule, is_layer: Callable[[str], bool], *, bits: int = 8,
                     quantize_output: bool = False) -> list[str]:
    """Insert observing ActQuant modules into ``gm`` in place; their names."""
    names: list[str] = []
    quant_of: dict[fx.Node, str] = {}

    def new(node: fx.Node) -> None:
        name = f"act_quant_{len(names)}"
        gm.add_submodule(name, ActQuant(bits))
        names.append(name)
        quant_of[_attach(gm, node, name)] = name

    for node in list(gm.graph.nodes):
        kind = _kind(gm, node, is_layer)
        if kind == "other" or node.op == "output":
            continue
        users = list(node.users)
        if not quantize_output and any(u.op == "output" for u in users):
            continue
        if kind == "pass":
            src = node.args[0] if node.args else None
            if isinstance(src, fx.Node) and src in quant_of:
                quant_of[_attach(gm, node, quant_of[src])] = quant_of[src]
            continue
        if users and all(_kind(gm, u, is_layer) == "relu" for u in users):
            continue
        if (kind == "input" or _after_compute(gm, node, kind, is_layer)) and \
                not _feeds_layer(gm, node, is_layer):
            continue
        new(node)
    for node in list(gm.graph.nodes):  # every quantized layer reads a quantized input
        if _kind(gm, node, is_layer) == "layer" and node.args:
            src = node.args[0]
            if isinstance(src, fx.Node) and src not in quant_of:
                with gm.graph.inserting_before(node):
                    name = f"act_quant_{len(names)}"
                    gm.add_submodule(name, ActQuant(bits))
                    names.append(name)
                    q = gm.graph.call_module(name, (src,))
                node.replace_input_with(src, q)
                quant_of[q] = name
    gm.graph.lint()
    gm.recompile()
    return names


def remove_unused(gm: fx.GraphModule) -> list[str]:
    """Drop ActQuant nodes whose module never saw a float tensor; the names dropped."""
    dropped: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if isinstance(m, ActQuant) and not m.saw_float:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            dropped.add(str(node.target))
    for name in dropped:
        gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    return sorted(dropped)


def feeding_quant(gm: fx.GraphModule, layer: str) -> ActQuant | None:
    """The ActQuant that feeds the call of module ``layer`` (None when its input is float)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == layer and node.args:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module":
                m = gm.get_submodule(str(src.target))
                if isinstance(m, ActQuant):
                    return m
    return None
