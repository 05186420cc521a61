"""How big a model is: parameter counts, how the parameters are stored, and bytes on disk.

A parameter counts as a parameter whatever its storage. A quantized layer keeps its weight
as integer codes (a buffer, e.g. ``weight_q`` of ``QuantConv2d``) or as codebook indices,
not as an ``nn.Parameter``; it is still that many weights. Such a *coded* layer exposes its
float value through ``dequantized_weight()`` or ``decoded_weight()`` (``torch.ao`` quantized
layers: ``weight()``) and its bit width as ``bits``; :func:`coded_weights` finds them all.
Storage is reported apart from the count: :func:`storage_summary` gives the bits per
parameter and the bytes the parameters take, by storage format.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress.errors import ArtefactError

__all__ = [
    "CodedWeight",
    "coded_weights",
    "effective_weight",
    "is_coded",
    "file_bytes",
    "nonzero_parameter_count",
    "parameter_count",
    "state_dict_bytes",
    "storage_summary",
]

_DECODERS = ("dequantized_weight", "decoded_weight")


@dataclass(frozen=True)
class CodedWeight:
    """A weight stored as ``bits``-bit codes instead of a float ``nn.Parameter``."""

    module: str
    numel: int
    nonzero: int
    bits: int
    codes: tuple[str, ...]  # the module's integer buffers that hold the codes


def _decoded(module: nn.Module) -> torch.Tensor | None:
    """The float value of a coded layer's weight, or ``None`` for any other module."""
    for name in _DECODERS:  # first: a coded layer may also show its value as ``weight``
        decode = getattr(module, name, None)
        if callable(decode):
            value = decode()
            return value if isinstance(value, torch.Tensor) else None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return None  # a float weight: counted among the parameters
    if callable(weight):  # torch.ao quantized Linear/Conv: weight() -> a quantized tensor
        try:
            value = weight()
        except (TypeError, RuntimeError):  # not a weight accessor after all
            return None
        if isinstance(value, torch.Tensor) and value.is_quantized:
            return value.dequantize()
    return None


def is_coded(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored as integer codes or codebook indices (a
    ``weight`` attribute it may also have is then its decoded value)."""
    with torch.no_grad():
        return _decoded(module) is not None


def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a layer computes with, as a float tensor: ``module.weight`` for a float
    layer, the dequantized/decoded value for a coded one, ``None`` without a weight."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return _decoded(module)


def _bits_of(module: nn.Module, value: torch.Tensor) -> int:
    bits = getattr(module, "bits", None)
    if isinstance(bits, int) and not isinstance(bits, bool):
        return bits
    return 8  # torch.ao quantized layers: qint8


def _coded(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    for name, module in model.named_modules():
        with torch.no_grad():
            value = _decoded(module)
        if value is not None:
            yield name, module, value


def coded_weights(model: nn.Module) -> list[CodedWeight]:
    """Every weight of ``model`` stored as integer codes, one entry per coded layer; a layer
    that reads another's code tensors (a quantized output layer's tied input embedding
    table) is that weight again and is not counted twice."""
    out: list[CodedWeight] = []
    seen: set[int] = set()
    for name, module, value in _coded(model):
        codes = tuple(n for n, b in module.named_buffers(recurse=False)
                      if not b.is_floating_point() and b.numel() == value.numel())
        shared = {id(getattr(module, n)) for n in codes}
        if shared and shared <= seen:
            continue
        seen |= shared
        out.append(CodedWeight(name, int(value.numel()), int(torch.count_nonzero(value)),
                               _bits_of(module, value), codes))
    return out


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements, whatever their storage: float ``nn.Parameter``s (a
    shared one counts once) plus the weights of coded layers (see the module docs)."""
    return (sum(p.numel() for p in model.parameters())
            + sum(c.numel for c in coded_weights(model)))


def nonzero_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (as :func:`parameter_count`) that are not exactly zero;
    a coded weight is zero when its dequantized value is."""
    with torch.no_grad():
        floats = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return floats + sum(c.nonzero for c in coded_weights(model))


def _format(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def storage_summary(model: nn.Module) -> dict[str, Any]:
    """How the parameters are stored, in memory (the artefact adds sparse coding and zstd).

    Keys: ``params`` (:func:`parameter_count`), ``bits`` (total storage bits: each float
    parameter at its dtype's width, each coded weight at its ``bits``, plus the coded layers'
    float side tensors such as scales and codebooks), ``bits_per_param``, ``bytes``
    (``bits / 8``) and ``formats``: parameter elements per storage format
    (``"float32"``, ``"int8"``, ``"int4"``...), plus ``"quantization scales"`` in bits.
    """
    formats: dict[str, int] = {}
    bits = 0
    for p in model.parameters():
        width = p.element_size() * 8
        formats[_format(p.dtype)] = formats.get(_format(p.dtype), 0) + p.numel()
        bits += p.numel() * width
    side_bits = 0
    for coded in coded_weights(model):
        key = f"int{coded.bits}"
        formats[key] = formats.get(key, 0) + coded.numel
        bits += coded.numel * coded.bits
        module = model.get_submodule(coded.module)
        side_bits += sum(b.numel() * b.element_size() * 8
                         for n, b in module.named_buffers(recurse=False)
                         if n not in coded.codes)
    bits += side_bits
    params = sum(formats.values())
    return {
        "params": params,
        "bits": bits,
        "bits_per_param": bits / params if params else None,
        "bytes": -(-bits // 8),
        "formats": dict(sorted(formats.items())),
        "side_bits": side_bits,
    }


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size baseline netpress compares to."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size in bytes of the file at ``path``."""
    if not os.path.isfile(path):
        raise ArtefactError(
            f"cannot measure the size of {os.fspath(path)!r}: no such file; check the path "
            f"the artefact was saved to"
        )
    return os.path.getsize(path)
