"""Group-quantized embedding tables (``GroupQuantEmbedding``: the input table of a language
model tied to its ``GPTQ``-quantized output layer) exported as ONNX Runtime's
``com.microsoft.GatherBlockQuantized``: the file keeps the 4-bit codes packed, as the output
layer's ``MatMulNBits`` does, instead of one byte per code.

``GatherBlockQuantized`` (``gather_axis=0``, ``quantize_axis=1``) gathers rows of a uint8
``data`` tensor holding ``bits``-bit codes (4 bits: two per byte along a row, the first in
the low nibble; 8 bits: one per byte), with ``scales`` of shape ``(rows, ceil(K /
block_size))`` and ``zero_points`` packed like the data, and returns ``(code - zero) ·
scale``. A netpress group of ``group_size`` columns maps onto whole blocks as for
``MatMulNBits`` (:func:`netpress.export.nbits.nbits_block_size`); symmetric signed codes are
shifted by ``2^(bits-1)``, with that as every block's zero point. Where the installed ONNX
Runtime does not run the op, the table keeps its portable form (int8 ``Gather`` of code rows
and the dequantization arithmetic), one byte per code.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netpress.export.nbits import nbits_block_size, nbits_weights, pack_codes

if TYPE_CHECKING:
    from netpress.reconstruct.modules import GroupQuantEmbedding

__all__ = ["GATHER_BITS", "gather_tensors", "gather_block_quantized_available", "NBitsEmbedding",
           "why_not_gather"]

#: Code widths ``GatherBlockQuantized`` takes (uint8 data).
GATHER_BITS = (4, 8)


def gather_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *,
                   bits: int, group_size: int, block_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(data, scales, zero_points)`` of ``GatherBlockQuantized`` for codes ``N × K`` (int8
    symmetric with ``zero`` None, or uint8 with uint8 ``zero`` ``N × groups``) and scales
    ``N × groups`` in groups of ``group_size`` columns, as blocks of ``block_size``."""
    if bits not in GATHER_BITS:
        raise ValueError(f"bits={bits}: GatherBlockQuantized takes {GATHER_BITS}")
    n, k = codes.shape
    w = nbits_weights(codes, scale, zero, bits=bits, group_size=group_size,
                      block_size=block_size)  # MatMulNBits' layout: the same blocks
    data = w.packed.reshape(n, -1)[:, :-(-k * bits // 8)]  # without the last block's padding
    zp = w.zero_points if w.zero_points is not None else pack_codes(
        torch.full(w.scales.shape, 1 << (bits - 1), dtype=torch.int32), bits)
    return data.contiguous(), w.scales, zp


@functools.cache
def gather_block_quantized_available(bits: int, block_size: int) -> str | None:
    """``None`` if the installed ONNX Runtime runs ``GatherBlockQuantized`` for
    ``bits``/``block_size`` on CPU and returns the expected rows, else why not."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        return f"cannot probe ONNX Runtime ({exc})"
    k, n = block_size * 2, 3
    codes = torch.arange(n * k).reshape(n, k) % (1 << bits)
    zero = torch.ones(n, 2, dtype=torch.uint8)
    scale = torch.tensor([[1.0, 2.0]] * n)
    data, scales, zp = gather_tensors(codes.to(torch.uint8), scale, zero, bits=bits,
                                      group_size=block_size, block_size=block_size)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(t.numpy(), name)
             for name, t in (("data", data), ("scales", scales), ("zp", zp))]
    node = h.make_node("GatherBlockQuantized", ["data", "ids", "scales", "zp"], ["Y"],
                       domain="com.microsoft", gather_axis=0, quantize_axis=1,
                       block_size=block_size, bits=bits)
    graph = h.make_graph([node], "probe", [h.make_tensor_value_info("ids", 7, [1, 2])],
                         [h.make_tensor_value_info("Y", 1, [1, 2, k])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                               h.make_opsetid("com.microsoft", 1)])
    ids = torch.tensor([[2, 0]])
    expected = (codes.float() - 1) * torch.repeat_interleave(scale, block_size, dim=1)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"ids": ids.numpy()})[0])
    except Exception as exc:  # the runtime's own error types differ between versions
        return f"ONNX Runtime {ort.__version__} cannot run it ({str(exc).splitlines()[0]})"
    if not torch.equal(out, expected[ids]):
        return f"ONNX Runtime {ort.__version__} returns other rows than the codes say"
    return None


def why_not_gather(table: GroupQuantEmbedding) -> str | None:
    """Why ``table`` cannot be written as ``GatherBlockQuantized`` here (``None``: it can)."""
    if table.bits not in GATHER_BITS:
        return f"GatherBlockQuantized takes bits in {GATHER_BITS}"
    if table.embedding_dim * table.bits % 8:
        return f"its rows of {table.embedding_dim} {table.bits}-bit codes do not fill whole bytes"
    block = nbits_block_size(table.embedding_dim, table.group_size)
    if block is None:
        return (f"group_size={table.group_size} is not a multiple of 16 (its blocks are "
                "powers of two ≥ 16)")
    return gather_block_quantized_available(table.bits, block)


class _GatherBlockQuantized(torch.autograd.Function):
    """The rows of ``table`` in PyTorch; ``com.microsoft::GatherBlockQuantized`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, data: torch.Tensor, scales: torch.Tensor,
                zero_points: torch.Tensor, table: torch.Tensor, bits: int,
                block_size: int) -> torch.Tensor:
        return table[ids]

    @staticmethod
    def symbolic(g: Any, ids: Any, data: Any, scales: Any, zero_points: Any, table: Any,
                 bits: int, block_size: int) -> Any:
        y = g.op("com.microsoft::GatherBlockQuantized", data, ids, scales, zero_points,
                 gather_axis_i=0, quantize_axis_i=1, block_size_i=block_size, bits_i=bits)
        sizes, width = ids.type().varyingSizes(), table.type().varyingSizes()
        if sizes is not None and width is not None:
            y.setType(table.type().with_sizes([*sizes, width[-1]]))
        return y


class NBitsEmbedding(nn.Module):
    """The export form of a ``GroupQuantEmbedding`` as ``GatherBlockQuantized``."""

    def __init__(self, table: GroupQuantEmbedding) -> None:
        super().__init__()
        block = nbits_block_size(table.embedding_dim, table.group_size)
        if block is None:
            raise ValueError(f"group_size={table.group_size} has no block size")
        data, scales, zp = gather_tensors(table.weight_q, table.weight_scale, table.weight_zero,
                                          bits=table.bits, group_size=table.group_size,
                                          block_size=block)
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zp)
        self.register_buffer("table", table.dequantized_weight().detach(), persistent=False)
        self.bits, self.block_size, self.scale_by = table.bits, block, table.scale_by

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = _GatherBlockQuantized.apply(ids, self.data, self.scales, self.zero_points,
                                        self.table, self.bits, self.block_size)
        assert isinstance(y, torch.Tensor)
        return y * self.scale_by if self.scale_by != 1.0 else y
