"""The nm_sparse artefact encoding: bit-exact, compact, and strict about bad files."""

import numpy as np
import pytest
import torch

import netpress.reconstruct  # noqa: F401  (registers nm_sparse)
from netpress.errors import ArtefactError
from netpress.export.codec import decode_tensor, encode_tensor, stored_nbytes
from netpress.reconstruct.patterns import nm_keep_mask


def _two_four(shape=(8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w.masked_fill(~nm_keep_mask(w.abs(), 2, 4), 0.0)


def test_two_four_float32_is_picked_and_bit_exact():
    w = _two_four()
    w[0, 0], w[0, 1] = -0.0, 0.0  # a -0.0 is a kept value, never lost
    w[1, :4] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    meta, arrays = encode_tensor(w)
    assert meta["encoding"] == "nm_sparse" and meta["n"] == 2
    back = decode_tensor(meta, arrays)
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))
    assert stored_nbytes(arrays) < stored_nbytes(encode_tensor(w, encoding="bitmask")[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_four_and_half_types(dtype):
    w = torch.randn(4, 8)
    w = w.masked_fill(~nm_keep_mask(w.abs(), 1, 4), 0.0).to(dtype)
    meta, arrays = encode_tensor(w, encoding="nm_sparse")
    assert meta["n"] == 1
    assert torch.equal(decode_tensor(meta, arrays).view(torch.int16 if w.element_size() == 2
                                                        else torch.int32),
                       w.view(torch.int16 if w.element_size() == 2 else torch.int32))


def test_declines_denser_or_odd_tensors():
    from netpress.export._nm_codec import _encode
    from netpress.export.codec import tensor_bits

    dense = torch.randn(4, 4)
    assert _encode(tensor_bits(dense), dense.dtype) is None
    odd = torch.zeros(6)
    assert _encode(tensor_bits(odd), odd.dtype) is None
    assert encode_tensor(torch.randn(3, 5))[0]["encoding"] != "nm_sparse"


def test_corrupt_arrays_are_refused():
    meta, arrays = encode_tensor(_two_four(), encoding="nm_sparse")
    short = dict(arrays, index=arrays["index"][:-1])
    with pytest.raises(ArtefactError, match="nm_sparse"):
        decode_tensor(meta, short)
    bad = dict(arrays, index=np.full_like(arrays["index"], 0xFF))
    with pytest.raises(ArtefactError, match="out of range"):
        decode_tensor(meta, bad)
    with pytest.raises(ArtefactError, match="metadata"):
        decode_tensor({**meta, "n": 3}, arrays)
