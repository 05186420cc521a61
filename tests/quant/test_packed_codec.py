"""The packed_int artefact encoding: lossless, and really k bits per value."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netpress.errors import ArtefactError
from netpress.export._quant_codec import ENCODING, pack_bits, unpack_bits
from netpress.export.codec import bits_equal, decode_tensor, encode_tensor


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 7), n=st.integers(1, 200), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2 ** bits, n).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.size == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, n), values)


@pytest.mark.parametrize(("lo", "hi", "dtype", "bits"), [
    (-7, 7, torch.int8, 4), (-1, 1, torch.int8, 2), (-3, 3, torch.int8, 3),
    (0, 15, torch.uint8, 4), (0, 3, torch.uint8, 2), (-128, -125, torch.int8, 2)])
def test_codes_are_packed_exactly(lo, hi, dtype, bits):
    t = torch.randint(lo, hi + 1, (16, 9, 3, 3), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int16).to(dtype)
    meta, arrays = encode_tensor(t)
    assert meta["encoding"] == ENCODING and meta["bits"] == bits
    assert sum(a.nbytes for a in arrays.values()) == -(-t.numel() * bits // 8)
    assert bits_equal(decode_tensor(meta, arrays), t)


def test_full_range_and_float_tensors_are_declined():
    full = torch.tensor([-128, 127, 0], dtype=torch.int8)
    assert encode_tensor(full)[0]["encoding"] != ENCODING
    assert encode_tensor(torch.zeros(8))[0]["encoding"] != ENCODING
    with pytest.raises(Exception, match="does not apply"):
        encode_tensor(torch.ones(4), encoding=ENCODING)


def test_corrupt_payloads_are_refused():
    t = torch.randint(-7, 8, (20,), dtype=torch.int8)
    meta, arrays = encode_tensor(t)
    with pytest.raises(ArtefactError, match="wrong size"):
        decode_tensor(meta, {"packed": arrays["packed"][:-1]})
    with pytest.raises(ArtefactError, match="bad metadata"):
        decode_tensor({**meta, "bits": 9}, arrays)
    with pytest.raises(ArtefactError, match="out of range"):
        decode_tensor({**meta, "offset": 126}, arrays)
