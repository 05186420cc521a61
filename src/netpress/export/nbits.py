"""Group-quantized Linear layers (``GPTQ``'s ``GroupQuantLinear``) exported as ONNX Runtime's
4-bit matmul, ``com.microsoft.MatMulNBits``, or as a portable fallback.

``MatMulNBits`` (ONNX Runtime contrib op, CPU kernel for ``bits`` 2/4/8) computes
``Y = A · dequant(B)ᵀ`` with the weight quantized in blocks of ``block_size`` (a power of two,
≥ 16) along K (the input features):

* ``B``: uint8 ``(N, k_blocks, block_size·bits/8)``; inside each block the codes are packed
  along K, the first code in the low bits of a byte (for 4 bits: low nibble, then high nibble);
* ``scales``: ``(N, k_blocks)`` in A's dtype;
* ``zero_points``: uint8 ``(N, ceil(k_blocks·bits/8))`` packed the same way (absent: 2^(bits-1));
* the dequantized weight is ``(code - zero_point) · scale``.

A netpress group of ``group_size`` columns maps onto whole blocks when ``block_size`` divides
it (the scale and zero point are repeated over the group's blocks); symmetric signed codes are
shifted by 2^(bits-1) and use the default zero point. Where the installed ONNX Runtime does not
run ``MatMulNBits`` for a layer, the layer is written as ``DequantizeLinear`` (uint8/int8 codes,
one scale per group) + ``MatMul`` — one byte per weight, every runtime — with a warning.

GPTQ quantizes Linear layers only: an encoder's embedding tables stay float (on
all-MiniLM-L6-v2 the word table is 47 of the file's 54 MB). ``DynamicQuantize`` after
``GPTQ`` swaps just them (the Linear layers are group-quantized by then) for int8 rows with
a scale per row, exported as int8 ``Gather`` + ``Mul``: ``[GPTQ(bits=4),
DynamicQuantize(layers=("re:.*embeddings.*",), outlier_channels=0)]``. A table tied to a
quantized output layer reads that layer's codes (``GroupQuantEmbedding``) and is exported as
``GatherBlockQuantized`` (:mod:`netpress.export.nbits_gather`).

The packing maths are pure functions (:func:`pack_codes`, :func:`unpack_codes`,
:func:`nbits_weights`); :func:`swap_for_export` replaces the layers of a model copy before
``torch.onnx.export``. ``onnxruntime`` is imported only to probe the op.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress.errors import ModelError

if TYPE_CHECKING:
    from netpress.reconstruct.modules import GroupQuantLinear

__all__ = ["NBITS_MODES", "NBitsWeights", "pack_codes", "unpack_codes", "nbits_block_size",
           "nbits_weights", "matmulnbits_available", "swap_for_export", "NBitsFallbackWarning"]

NBITS_MODES = ("auto", "matmulnbits", "dequantize")
_KERNEL_BITS = (2, 4, 8)
_MAX_BLOCK = 128


class NBitsFallbackWarning(UserWarning):
    """A group-quantized layer is exported as DequantizeLinear + MatMul, not MatMulNBits."""


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (``... × n``, values < 2^bits) along the last axis, first code in
    the low bits: ``... × ceil(n·bits/8)`` uint8 (the tail padded with zero codes)."""
    if bits not in _KERNEL_BITS:
        raise ValueError(f"bits={bits}: packing supports {_KERNEL_BITS}")
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = F.pad(codes.to(torch.int32), (0, pad)).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Invert :func:`pack_codes`: the first ``n`` codes of each row, uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def nbits_block_size(in_features: int, group_size: int) -> int | None:
    """The MatMulNBits block size for ``group_size`` columns per group: the largest power of
    two ≤ 128 dividing it (any, when one group spans the row); ``None`` if below 16."""
    if group_size >= in_features:
        return _MAX_BLOCK if in_features >= _MAX_BLOCK else max(16, 1 << (in_features - 1)
                                                                .bit_length())
    block = group_size & -group_size  # the largest power of two dividing it
    block = min(block, _MAX_BLOCK)
    return block if block >= 16 else None


@dataclass(frozen=True)
class NBitsWeights:
    """The MatMulNBits initializers of one layer (see the module docstring)."""

    packed: torch.Tensor          # N × k_blocks × blob, uint8
    scales: torch.Tensor          # N × k_blocks, float32
    zero_points: torch.Tensor | None  # N × ceil(k_blocks·bits/8), uint8 (None: default)
    block_size: int
    bits: int


def nbits_weights(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *,
                  bits: int, group_size: int, block_size: int) -> NBitsWeights:
    """MatMulNBits tensors of codes ``N × K`` (int8 symmetric, zero ``None``; or uint8 with
    uint8 ``zero`` ``N × groups``) and scales ``N × groups``, groups of ``group_size``."""
    n, k = codes.shape
    if group_size < k and group_size % block_size:
        raise ValueError(f"block_size={block_size} does not divide group_size={group_size}")
    k_blocks = -(-k // block_size)
    group_of_block = torch.clamp(torch.arange(k_blocks) * block_size // group_size,
                                 max=scale.shape[1] - 1)
    offset = 1 << (bits - 1)
    if zero is None:
        unsigned, zp = codes.to(torch.int32) + offset, None
        pad_value = offset
    else:
        unsigned, zp = codes.to(torch.int32), zero.to(torch.int32)[:, group_of_block]
        pad_value = 0
    padded = F.pad(unsigned, (0, k_blocks * block_size - k), value=pad_value)
    blocks = padded.reshape(n, k_blocks, block_size)
    return NBitsWeights(pack_codes(blocks, bits), scale.float()[:, group_of_block].contiguous(),
                        None if zp is None else pack_codes(zp, bits), block_size, bits)


@functools.cache
def matmulnbits_available(bits: int, block_size: int) -> str | None:
    """``None`` if the installed ONNX Runtime runs MatMulNBits for ``bits``/``block_size`` on
    CPU, else why not (a one-line reason)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        return f"cannot probe ONNX Runtime ({exc})"
    k, n = block_size * 2, 4
    w = nbits_weights(torch.zeros(n, k, dtype=torch.uint8), torch.ones(n, 2),
                      torch.zeros(n, 2, dtype=torch.uint8), bits=bits, group_size=block_size,
                      block_size=block_size)
    assert w.zero_points is not None
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(t.numpy(), name) for name, t in
             (("B", w.packed), ("scales", w.scales), ("zp", w.zero_points))]
    node = h.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                       K=k, N=n, bits=bits, block_size=block_size)
    graph = h.make_graph([node], "probe", [h.make_tensor_value_info("A", 1, [1, k])],
                         [h.make_tensor_value_info("Y", 1, [1, n])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                               h.make_opsetid("com.microsoft", 1)])
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, {"A": torch.ones(1, k).numpy()})
    except Exception as exc:  # the runtime's own error types differ between versions
        return f"ONNX Runtime {ort.__version__} cannot run it ({str(exc).splitlines()[0]})"
    return None


class _MatMulNBits(torch.autograd.Function):
    """``x · dequant(B)ᵀ`` in PyTorch; ``com.microsoft::MatMulNBits`` in the ONNX graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zero_points: torch.Tensor, weight: torch.Tensor, k: int, n: int, bits: int,
                block_size: int, accuracy_level: int) -> torch.Tensor:
        return x @ weight.t()

    @staticmethod
    def symbolic(g: Any, x: Any, packed: Any, scales: Any, zero_points: Any, weight: Any,
                 k: int, n: int, bits: int, block_size: int, accuracy_level: int) -> Any:
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, zero_points, K_i=k, N_i=n,
                 bits_i=bits, block_size_i=block_size, accuracy_level_i=accuracy_level)
        sizes = x.type().varyingSizes()  # the output's type, for the exporter's inference
        if sizes is not None:
            y.setType(x.type().with_sizes([*sizes[:-1], n]))
        return y


class NBitsLinear(nn.Module):
    """The export form of a ``GroupQuantLinear`` as MatMulNBits (+ bias ``Add``)."""

    def __init__(self, layer: GroupQuantLinear, block_size: int, accuracy_level: int) -> None:
        super().__init__()
        w = nbits_weights(layer.weight_q, layer.weight_scale, layer.weight_zero,
                          bits=layer.bits, group_size=layer.group_size, block_size=block_size)
        zp = w.zero_points if w.zero_points is not None else pack_codes(
            torch.full_like(w.scales, 1 << (w.bits - 1), dtype=torch.int32), w.bits)
        self.register_buffer("packed", w.packed)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zero_points", zp)
        self.register_buffer("weight", layer.dequantized_weight().detach(), persistent=False)
        self.bias = layer.bias
        self.k, self.n, self.bits = layer.in_features, layer.out_features, layer.bits
        self.block_size, self.accuracy_level = block_size, accuracy_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.zero_points, self.weight,
                               self.k, self.n, self.bits, self.block_size, self.accuracy_level)
        return y if self.bias is None else y + self.bias


class DequantLinear(nn.Module):
    """The portable export form: ``DequantizeLinear`` of one byte per code (a scale and zero
    point per group, as rows of ``group_size`` codes), reshaped to ``N × K``, then MatMul."""

    def __init__(self, layer: GroupQuantLinear) -> None:
        super().__init__()
        n, k = layer.weight_q.shape
        gs = min(layer.group_size, k)
        groups = layer.weight_scale.shape[1]
        codes = layer.weight_q
        zero = layer.weight_zero if layer.weight_zero is not None \
            else torch.zeros_like(layer.weight_scale, dtype=codes.dtype)
        codes = F.pad(codes, (0, groups * gs - k))  # the padded columns are sliced off
        self.register_buffer("codes", codes.reshape(n * groups, gs).contiguous())
        self.register_buffer("scale", layer.weight_scale.float().reshape(-1).contiguous())
        self.register_buffer("zero", zero.reshape(-1).contiguous())
        self.bias, self.n, self.k = layer.bias, n, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Dequantize.apply(self.codes, self.scale, self.zero, self.n, self.k)
        return F.linear(x, w, self.bias)


class _Dequantize(torch.autograd.Function):
    """The ``N × K`` weight of per-group codes; ``DequantizeLinear`` (per row of
    ``group_size`` codes, axis 0) + ``Reshape`` (+ ``Slice``) in the ONNX graph."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                n: int, k: int) -> torch.Tensor:
        w = (codes.float() - zero.float().unsqueeze(1)) * scale.unsqueeze(1)
        return w.reshape(n, -1)[:, :k]

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero: Any, n: int, k: int) -> Any:
        w = g.op("DequantizeLinear", codes, scale, zero, axis_i=0)
        w = g.op("Reshape", w, g.op("Constant", value_t=torch.tensor([n, -1])))
        return g.op("Slice", w, g.op("Constant", value_t=torch.tensor([0])),
                    g.op("Constant", value_t=torch.tensor([k])),
                    g.op("Constant", value_t=torch.tensor([1])))


def swap_for_export(model: nn.Module, mode: str = "auto", *,
                    accuracy_level: int = 0) -> dict[str, str]:
    """Replace every ``GroupQuantLinear`` of ``model`` (in place: pass a copy) by its export
    form; returns ``{layer: "MatMulNBits" | "DequantizeLinear+MatMul"}``. Group-quantized
    embedding tables become ``GatherBlockQuantized`` where it runs
    (:mod:`netpress.export.nbits_gather`; ``{table: "GatherBlockQuantized"}``).

    ``mode``: ``"auto"`` (MatMulNBits where the installed ONNX Runtime runs it, else the
    fallback with a :class:`NBitsFallbackWarning`), ``"matmulnbits"`` (a ModelError where it
    cannot) or ``"dequantize"`` (the fallback everywhere).
    """
    from netpress.export.nbits_gather import NBitsEmbedding, why_not_gather
    from netpress.reconstruct.modules import GroupQuantEmbedding
    from netpress.reconstruct.modules import GroupQuantLinear as _GroupQuantLinear

    if mode not in NBITS_MODES:
        raise ModelError(f"export_onnx: nbits={mode!r}; choose one of {NBITS_MODES}")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _GroupQuantLinear)]
    done: dict[str, str] = {}
    fallen: dict[str, list[str]] = {}
    tables = [(n, m) for n, m in model.named_modules() if isinstance(m, GroupQuantEmbedding)]
    for name, table in tables if mode != "dequantize" else []:
        why = why_not_gather(table)
        if why is not None and mode == "matmulnbits":
            raise ModelError(f"export_onnx: table {name!r} cannot be GatherBlockQuantized: "
                             f"{why}; export with nbits='auto' or 'dequantize'")
        if why is not None:  # its own forward: an int8 Gather of code rows, every runtime
            fallen.setdefault(why, []).append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, NBitsEmbedding(table))
        done[name] = "GatherBlockQuantized"
    for name, layer in found:
        why = _why_not(layer) if mode != "dequantize" else None
        if why is not None and mode == "matmulnbits":
            raise ModelError(f"export_onnx: layer {name!r} cannot be MatMulNBits: {why}; "
                             "export with nbits='auto' or 'dequantize'")
        if why is not None:
            fallen.setdefault(why, []).append(name)
        block = nbits_block_size(layer.in_features, layer.group_size)
        new: nn.Module = NBitsLinear(layer, block, accuracy_level) \
            if mode != "dequantize" and why is None and block is not None \
            else DequantLinear(layer)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        done[name] = "MatMulNBits" if isinstance(new, NBitsLinear) else "DequantizeLinear+MatMul"
    for why, names in fallen.items():
        shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        warnings.warn(f"export_onnx: {len(names)} group-quantized layer(s) ({shown}) are "
                      f"written with one byte per code (DequantizeLinear + MatMul, or an int8 "
                      f"Gather for tables), not MatMulNBits / GatherBlockQuantized: {why}",
                      NBitsFallbackWarning, stacklevel=3)
    return done


def _why_not(layer: GroupQuantLinear) -> str | None:
    if layer.bits not in _KERNEL_BITS:
        return f"MatMulNBits takes bits in {_KERNEL_BITS}"
    block = nbits_block_size(layer.in_features, layer.group_size)
    if block is None:
        return (f"group_size={layer.group_size} is not a multiple of 16 (MatMulNBits blocks "
                "are powers of two ≥ 16)")
    return matmulnbits_available(layer.bits, block)
