"""Quantized layers: integer weights with their scales, and activation fake-quantizers.

* :class:`QuantConv2d` / :class:`QuantLinear` hold their weight as integer codes
  (``weight_q``, int8) with per-output-channel (or per-group) scales ``weight_scale``; the
  forward pass dequantizes them and runs the float op, so outputs equal what an integer
  runtime computes up to accumulation order. The artefact stores the codes, not floats.
* :class:`ActQuant` fake-quantizes a tensor per tensor (uint8, asymmetric by default). While
  ``observer`` is set it only watches the values (calibration); :meth:`ActQuant.freeze`
  turns the statistics into ``scale``/``zero_point``.

During ``torch.onnx.export`` the modules emit ``QuantizeLinear``/``DequantizeLinear``
nodes (int8 weight initializers + DequantizeLinear, uint8 Q/DQ pairs on activations), which
ONNX Runtime fuses into integer kernels. All three register with
:func:`netpress.export.modules.register_module_type`, so artefacts save and load them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress.export.modules import register_module_type
from netpress.quant.observers import Observer, observed_rows
from netpress.quant.primitives import (
    dequantize_affine,
    fake_quantize,
    qrange,
    quantize_affine,
)
from netpress.quant.target import TARGETS

__all__ = ["ActQuant", "QuantWeight", "QuantConv2d", "QuantLinear", "QUANT_LAYERS",
           "ConvGeometry", "conv2d_geometry",
           "quantize_layer"]


class _QDQ(torch.autograd.Function):
    """Fake quantization that exports as an ONNX QuantizeLinear + DequantizeLinear pair."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zero_point: int, qmin: int,
                qmax: int) -> torch.Tensor:
        # only traced by the ONNX exporter (the symbolic replaces it): shapes matter, not bits
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zero_point: int, qmin: int, qmax: int) -> Any:
        dtype = torch.uint8 if qmin >= 0 else torch.int8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _DQWeight(torch.autograd.Function):
    """Dequantize int8 per-channel weight codes; exports as DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_affine(codes, scale, torch.zeros_like(scale, dtype=torch.int32),
                                 axis=0)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any) -> Any:
        channels = codes.type().sizes()[0]
        z = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, z, axis_i=0)


class ActQuant(nn.Module):
    """Per-tensor activation fake-quantizer (observing while ``observer`` is set)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__()
        qrange(bits, symmetric=symmetric)  # validates
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.observer: Observer | None = None
        self.saw_float = False
        self.export_qparams: tuple[float, int] | None = None  # set by export_onnx

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, symmetric=self.symmetric)

    def forward(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.observer is not None:
            self.observer.update(observed_rows(x))
            self.saw_float = True
            return x
        qmin, qmax = self.qrange
        if torch.onnx.is_in_onnx_export():
            if self.export_qparams is None:
                raise RuntimeError("call prepare_export() before torch.onnx.export")
            return _QDQ.apply(x, *self.export_qparams, qmin, qmax)
        return fake_quantize(x, self.scale, self.zero_point, self.bits,
                             symmetric=self.symmetric)

    def prepare_export(self) -> None:
        """Cache the qparams as Python numbers (the ONNX tracer cannot read buffers as such)."""
        self.export_qparams = (float(self.scale), int(self.zero_point))

    @torch.no_grad()
    def freeze(self) -> None:
        """Set ``scale``/``zero_point`` from the observer and stop observing."""
        if self.observer is None:
            return
        scale, zp = self.observer.qparams(self.bits, symmetric=self.symmetric)
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zp.reshape(()))
        self.observer = None


class _DQBias(torch.autograd.Function):
    """An int32 bias on the grid ``step``; exports as DequantizeLinear(int32 codes, axis=0)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return codes.double().mul(step.double()).float()

    @staticmethod
    def symbolic(g: Any, codes: Any, step: Any) -> Any:
        channels = codes.type().sizes()[0]
        z = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int32))
        return g.op("DequantizeLinear", codes, step, z, axis_i=0)


_INT32_MAX = 2 ** 31 - 1


class QuantWeight(nn.Module):
    """Shared parts of the quantized layers: int8 codes, scales, float bias.

    ``export_bias_step`` (set by :func:`netpress.export.onnx.export_onnx` when the layer's
    input is quantized) is the int32 grid ``input_scale * weight_scale`` of an integer
    kernel: the bias then exports as int32 codes + ``DequantizeLinear``, the form ONNX
    Runtime needs to fuse a Gemm into ``QGemm``.
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    export_bias_step: torch.Tensor | None = None

    def _init_weight(self, shape: tuple[int, ...], bits: int, bias: bool,
                     target: str | None) -> None:
        qrange(bits, symmetric=True)
        if target is not None and target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {TARGETS}")
        self.bits = bits
        self.target = target  # the INT8 target its codes were made for (None: not an int kernel)
        self.register_buffer("weight_q", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(shape[0], dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(shape[0])) if bias else None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Quantize the float ``weight`` with per-channel ``scale`` into ``weight_q``."""
        zp = torch.zeros_like(scale, dtype=torch.int32)
        self.set_codes(quantize_affine(weight.float(), scale, zp, self.bits, symmetric=True,
                                       axis=0), scale)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Store integer ``codes`` (within the layer's bit width) and their per-channel
        ``scale``."""
        qmin, qmax = qrange(self.bits, symmetric=True)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"weight codes outside [{qmin}, {qmax}] for bits={self.bits}")
        self.weight_q.copy_(codes.to(torch.int8))
        self.weight_scale.copy_(scale)

    def export_bias(self) -> torch.Tensor | None:
        """The bias, as int32 codes + DequantizeLinear while exporting with a known grid."""
        step, bias = self.export_bias_step, self.bias
        if bias is None or step is None or not torch.onnx.is_in_onnx_export():
            return bias
        codes = torch.round(bias.detach().double() / step.double())
        if bool(codes.abs().max() > _INT32_MAX) or not bool((step > 0).all()):
            return bias  # off the int32 grid: stay float (ONNX Runtime then keeps a float op)
        out = _DQBias.apply(codes.to(torch.int32), step.float())
        assert isinstance(out, torch.Tensor)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            out = _DQWeight.apply(self.weight_q, self.weight_scale)
            assert isinstance(out, torch.Tensor)
            return out
        zp = torch.zeros_like(self.weight_scale, dtype=torch.int32)
        return dequantize_affine(self.weight_q, self.weight_scale, zp, axis=0)


def conv2d_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The constructor arguments of ``conv`` that fix its shapes (a 2-d, zero-padded conv)."""
    ks = conv.kernel_size
    assert conv.padding_mode == "zeros" and len(ks) == 2
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": (ks[0], ks[1]), "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "groups": conv.groups}


class ConvGeometry(nn.Module):
    """The shape of a Conv2d whose weight is stored in another form (integer codes, codebook
    indices): its attributes, its spec for the artefact, and the ``F.conv2d`` call."""

    bias: torch.Tensor | None
    bits: int

    def _set_geometry(self, in_channels: int, out_channels: int,
                      kernel_size: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int] | str, dilation: tuple[int, int],
                      groups: int) -> tuple[int, int, int, int]:
        """Set the conv attributes; returns the weight's shape."""
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), stride, padding
        self.dilation, self.groups = dilation, groups
        kh, kw = self.kernel_size
        return (out_channels, in_channels // groups, kh, kw)

    def spec(self) -> dict[str, Any]:
        """The constructor arguments (geometry, bias, bits): how the artefact rebuilds it."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "bias": self.bias is not None, "bits": self.bits}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())

    def _conv(self, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantConv2d(QuantWeight, ConvGeometry):
    """A Conv2d whose weight is int8 codes times a per-output-channel scale."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True,
                 bits: int = 8, target: str | None = None) -> None:
        super().__init__()
        shape = self._set_geometry(in_channels, out_channels, kernel_size, stride, padding,
                                   dilation, groups)
        self._init_weight(shape, bits, bias, target)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in _conv_spec(self).items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.dequantized_weight(), self.export_bias())

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int) -> QuantConv2d:
        q = cls(**conv2d_geometry(conv), bias=conv.bias is not None, bits=bits)
        return q.to(conv.weight.device)


class QuantLinear(QuantWeight):
    """A Linear whose weight is int8 codes times a per-output-channel scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bits: int = 8, target: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bits, bias, target)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in _linear_spec(self).items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.export_bias())

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                bits=bits)
        return q.to(linear.weight.device)


QUANT_LAYERS: dict[type[nn.Module], type[QuantConv2d] | type[QuantLinear]] = {
    nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
"""Float layer type -> its quantized counterpart (exact types)."""


def quantize_layer(layer: nn.Module, bits: int, scale: torch.Tensor, *,
                   codes: torch.Tensor | None = None, target: str | None = None) -> QuantWeight:
    """The quantized counterpart of ``layer``: its weights rounded to the nearest point of the
    grid ``scale``, or the given integer ``codes``; ``target`` labels the INT8 target the
    codes were made for."""
    q: QuantWeight
    if isinstance(layer, nn.Conv2d):
        q = QuantConv2d.from_float(layer, bits)
    elif isinstance(layer, nn.Linear):
        q = QuantLinear.from_float(layer, bits)
    else:
        raise TypeError(f"cannot quantize a {type(layer).__name__}")
    q.target = target
    if codes is None:
        q.set_weight(layer.weight.detach(), scale)
    else:
        q.set_codes(codes, scale)
    if layer.bias is not None and q.bias is not None:
        with torch.no_grad():
            q.bias.copy_(layer.bias.detach())
    return q


def _target(m: QuantWeight) -> dict[str, Any]:
    return {"target": m.target} if m.target is not None else {}


def _conv_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, QuantConv2d)
    return {**m.spec(), **_target(m)}


def _linear_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, QuantLinear)
    return {"in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "bits": m.bits, **_target(m)}


def _act_spec(m: nn.Module) -> dict[str, Any] | None:
    assert isinstance(m, ActQuant)
    return None if m.observer is not None else {"bits": m.bits, "symmetric": m.symmetric}


register_module_type(QuantConv2d, _conv_spec, QuantConv2d, name="netpress.QuantConv2d")
register_module_type(QuantLinear, _linear_spec, QuantLinear, name="netpress.QuantLinear")
register_module_type(ActQuant, _act_spec, ActQuant, name="netpress.ActQuant")
