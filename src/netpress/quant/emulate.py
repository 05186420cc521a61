"""Run a quantized model with its integer layers computed as a given CPU's kernels compute them.

Inside :func:`emulated_kernels`, every quantized layer fed by an activation quantizer (a layer
ONNX Runtime runs as an integer kernel) takes its input's uint8 codes and its int8 weight codes
through :func:`~netpress.quant.saturation.conv2d_u8s8` /
:func:`~netpress.quant.saturation.u8s8_matmul`, subtracts the zero point's share, and scales
the int32 sums back, as the deployed kernel does. With ``cpu="x86-avx2"`` the pairs of
products saturate in 16 bits, so the model's outputs are those of an AVX2 machine without one;
with any other target the sums are exact and match the fake-quant model up to float rounding.
It is numpy, slow (seconds per image batch on ResNets): a tool for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from netpress.quant._insert import feeding_quant
from netpress.quant.modules import ActQuant, QuantConv2d, QuantLinear, QuantWeight
from netpress.quant.saturation import conv2d_u8s8, u8s8_matmul

__all__ = ["emulated_kernels", "integer_output"]


def _codes(x: torch.Tensor, aq: ActQuant) -> tuple[np.ndarray, int]:
    qmin, qmax = aq.qrange
    if qmin < 0:
        raise ValueError("the kernel emulation takes uint8 activations (asymmetric quantizers)")
    zp = int(aq.zero_point)
    q = torch.clamp(torch.round(x.detach().float() / aq.scale) + zp, qmin, qmax)
    return q.to(torch.uint8).cpu().numpy(), zp


def integer_output(layer: QuantWeight, aq: ActQuant, x: torch.Tensor, *,
                   saturate: bool) -> torch.Tensor:
    """``layer(x)`` computed from integer codes as an integer kernel does (``x`` is the
    output of ``aq``, the activation quantizer feeding ``layer``)."""
    a, zp = _codes(x, aq)
    w = layer.weight_q.cpu().numpy()
    shape: tuple[int, ...]
    if isinstance(layer, QuantConv2d):
        if isinstance(layer.padding, str):
            raise ValueError("the kernel emulation needs numeric conv padding")
        acc = conv2d_u8s8(a, w, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=layer.groups, pad_value=zp,
                          saturate=saturate).astype(np.int64)
        wsum = w.astype(np.int64).reshape(w.shape[0], -1).sum(1)
        acc -= zp * wsum.reshape(1, -1, 1, 1)
        shape = (1, -1, 1, 1)
    elif isinstance(layer, QuantLinear):
        rows = a.reshape(-1, a.shape[-1])
        acc = u8s8_matmul(rows, np.ascontiguousarray(w.T), saturate=saturate).astype(np.int64)
        acc -= zp * w.astype(np.int64).sum(1).reshape(1, -1)
        acc = acc.reshape(*a.shape[:-1], w.shape[0])
        shape = (-1,)
    else:
        raise TypeError(f"cannot emulate a {type(layer).__name__}")
    step = (aq.scale.double() * layer.weight_scale.double()).reshape(shape)
    out = torch.from_numpy(acc).double() * step
    if layer.bias is not None:
        out = out + layer.bias.detach().double().reshape(shape)
    return out.to(x.dtype)


@contextmanager
def emulated_kernels(model: nn.Module, cpu: str = "x86-avx2") -> Iterator[nn.Module]:
    """Within the block, ``model``'s integer layers compute as ``cpu``'s kernels do."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError("emulated_kernels takes the graph model npr.Quantize returns")
    saturate = cpu == "x86-avx2"
    hooks = []
    for name, layer in model.named_modules():
        aq = feeding_quant(model, name) if isinstance(layer, QuantWeight) else None
        if aq is None:
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor,
                 aq: ActQuant = aq) -> torch.Tensor:
            assert isinstance(mod, QuantWeight)
            return integer_output(mod, aq, args[0], saturate=saturate)

        hooks.append(layer.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
