"""Group-quantized embedding tables exported as ONNX Runtime's GatherBlockQuantized: the
tensors against a brute-force dequantization, ONNX Runtime against the PyTorch table, the
fallback and the file size."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from netpress.errors import ModelError
from netpress.export.nbits import (
    NBitsFallbackWarning,
    nbits_block_size,
    swap_for_export,
    unpack_codes,
)
from netpress.export.nbits_gather import gather_block_quantized_available, gather_tensors
from netpress.export.onnx import export_onnx, ort_run, ort_session
from netpress.reconstruct.modules import GroupQuantEmbedding, GroupQuantLinear

pytest.importorskip("onnxruntime")


def _table(rows: int, dim: int, bits: int, group: int, symmetric: bool,
           seed: int = 0) -> GroupQuantEmbedding:
    g = torch.Generator().manual_seed(seed)
    t = GroupQuantEmbedding(rows, dim, bits, group, symmetric)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if symmetric else (0, 1 << bits)
    groups = t.weight_scale.shape[1]
    zero = None if symmetric else torch.randint(0, 1 << bits, (rows, groups), generator=g)
    t.set_codes(torch.randint(lo, hi, (rows, dim), generator=g),
                (torch.rand(rows, groups, generator=g) + 0.1).half(), zero)
    return t


@pytest.mark.parametrize(("bits", "dim", "group", "symmetric"),
                         [(4, 64, 16, False), (4, 96, 48, True), (4, 64, 128, False),
                          (4, 96, 128, True), (8, 64, 32, False), (8, 48, 16, True)])
def test_tensors_dequantize_to_the_table(bits, dim, group, symmetric):
    t = _table(5, dim, bits, group, symmetric)
    block = nbits_block_size(dim, group)  # 128 for a 96-wide row in one group: padded
    assert block is not None
    data, scales, zp = gather_tensors(t.weight_q, t.weight_scale, t.weight_zero, bits=bits,
                                      group_size=group, block_size=block)
    # brute force: unpack every code and zero point, one scale per block of columns
    codes = unpack_codes(data, bits, dim).float()
    zeros = unpack_codes(zp, bits, scales.shape[1]).float()
    col_block = torch.arange(dim) // block
    brute = (codes - zeros[:, col_block]) * scales[:, col_block]
    assert torch.equal(brute, t.dequantized_weight())


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 16, False), (4, 48, True), (4, 128, False), (8, 32, False)])
def test_onnx_runtime_gathers_the_same_rows(tmp_path, bits, group, symmetric):
    if gather_block_quantized_available(bits, 16) is not None:
        pytest.skip(gather_block_quantized_available(bits, 16))
    model = nn.Sequential(_table(50, 96, bits, group, symmetric))
    ids = torch.tensor([[0, 49, 7, 7], [3, 1, 2, 0]])
    path = tmp_path / "t.onnx"
    export_onnx(model, path, ids)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GatherBlockQuantized" in ops
    out = torch.from_numpy(ort_run(ort_session(path), ids[:1]))  # another batch size
    assert torch.equal(out, model(ids[:1]))


def test_packed_table_file_is_about_half_the_byte_per_code_one(tmp_path):
    if gather_block_quantized_available(4, 32) is not None:
        pytest.skip(gather_block_quantized_available(4, 32))
    model = nn.Sequential(_table(4096, 64, 4, 32, False))
    ids = torch.tensor([[1, 2, 3]])
    export_onnx(model, tmp_path / "packed.onnx", ids)
    export_onnx(model, tmp_path / "bytes.onnx", ids, nbits="dequantize")
    packed, full = ((tmp_path / f).stat().st_size for f in ("packed.onnx", "bytes.onnx"))
    # 4096 x 64 codes: 128 KiB packed against 256 KiB at a byte each (+ scales, zeros)
    assert packed < 0.65 * full


def test_unsupported_width_falls_back_or_is_refused():
    model = nn.Sequential(_table(8, 64, 3, 16, False))
    with pytest.warns(NBitsFallbackWarning, match="bits in"):
        done = swap_for_export(model, "auto")
    assert done == {} and isinstance(model[0], GroupQuantEmbedding)
    with pytest.raises(ModelError, match=r"table '0' cannot be GatherBlockQuantized"):
        swap_for_export(nn.Sequential(_table(8, 64, 3, 16, False)), "matmulnbits")


def test_tied_linear_and_table_both_swap():
    head = GroupQuantLinear(64, 32, bias=False, bits=4, group_size=32)
    table = GroupQuantEmbedding.tied_to(head, nn.Embedding(32, 64))
    model = nn.ModuleDict({"embed": table, "head": head})
    done = swap_for_export(model, "auto")
    if gather_block_quantized_available(4, 32) is None:
        assert done == {"embed": "GatherBlockQuantized", "head": "MatMulNBits"}
