"""Exact round trips of the artefact tensor codec (netpress.export.codec)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from netpress.errors import ArtefactError, ModelError
from netpress.export.codec import (
    DTYPES,
    bits_equal,
    decode_tensor,
    encode_tensor,
    encoding_names,
    register_encoding,
    stored_nbytes,
)

_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CORE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
               torch.int32, torch.int64, torch.bool, torch.float64]


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    meta, arrays = encode_tensor(t)
    return decode_tensor(meta, arrays)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of any supported dtype and shape, random bit patterns, any sparsity.

    Random bits include NaNs (with payloads), infinities and subnormals; ``signed_zeros`` puts
    -0.0 (only the sign bit set) among the zeros.
    """
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12))
    numel = math.prod(shape)
    width = torch.empty((), dtype=dtype).element_size()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    udtype = np.dtype(f"<u{width}")
    arr = rng.integers(0, np.iinfo(udtype).max, size=numel, dtype=udtype, endpoint=True)
    arr[rng.random(numel) >= density] = 0
    if draw(st.booleans()) and dtype.is_floating_point:
        arr[(arr == 0) & (rng.random(numel) < 0.5)] = udtype.type(1 << (8 * width - 1))
    if dtype == torch.bool:
        arr = arr & 1
    raw = torch.from_numpy(arr.view(f"<i{width}") if width > 1 else arr)
    return raw.view(_WIDTH[width]).view(dtype).reshape(shape)


@settings(max_examples=300, deadline=None)
@given(tensors())
def test_roundtrip_is_bit_exact(t: torch.Tensor) -> None:
    out = roundtrip(t)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert bits_equal(out, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_negative_zero_and_nan_survive(dtype: torch.dtype) -> None:
    t = torch.zeros(1000, dtype=dtype)
    t[::7] = -0.0
    t[3] = float("nan")
    t[5] = -float("inf")
    t[11] = 1.5
    meta, arrays = encode_tensor(t)
    assert meta["encoding"] == "bitmask"  # -0.0 counts as a zero, its sign is kept aside
    out = decode_tensor(meta, arrays)
    assert bits_equal(out, t)
    assert torch.signbit(out[::7]).all() and not torch.signbit(out[1])
    assert torch.isnan(out[3])


@pytest.mark.parametrize("dtype", CORE_DTYPES)
def test_special_shapes(dtype: torch.dtype) -> None:
    for t in (torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype),
              torch.zeros(0, 3, dtype=dtype), torch.zeros(4, 0, dtype=dtype),
              torch.zeros(17, 5, dtype=dtype), torch.ones(3, 4, dtype=dtype)):
        assert bits_equal(roundtrip(t), t)


def test_bitmask_chosen_for_sparse_float32_and_sized_as_promised() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(256, 300, generator=g)
    t[torch.rand(t.shape, generator=g) < 0.8] = 0.0
    meta, arrays = encode_tensor(t)
    nnz = int((t != 0).sum())
    assert meta["encoding"] == "bitmask" and meta["nnz"] == nnz
    assert stored_nbytes(arrays) == math.ceil(t.numel() / 8) + nnz * 4
    assert bits_equal(decode_tensor(meta, arrays), t)


def test_dense_chosen_when_bitmask_does_not_pay() -> None:
    t = torch.randn(64, 64)
    meta, arrays = encode_tensor(t)
    assert meta["encoding"] == "dense" and stored_nbytes(arrays) == t.numel() * 4
    assert meta["byte_planes"] == {"values": "u4"}


def test_all_zero_costs_one_bit_per_element() -> None:
    t = torch.zeros(1024, dtype=torch.bfloat16)
    meta, arrays = encode_tensor(t)
    assert meta["encoding"] == "bitmask" and stored_nbytes(arrays) == 1024 // 8


def test_noncontiguous_and_conj_inputs() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = base.t()[::2]
    assert bits_equal(roundtrip(t), t.contiguous())


def test_unsupported_dtype_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64), name="w")


def _tamper(meta: dict, stored: dict, **changes: object) -> None:
    with pytest.raises(ArtefactError):
        decode_tensor({**meta, **changes}, stored, name="w")


def test_inconsistent_metadata_is_rejected() -> None:
    t = torch.zeros(100)
    t[::9] = 1.0
    meta, arrays = encode_tensor(t)
    _tamper(meta, arrays, shape=[200])
    _tamper(meta, arrays, shape=[-1, 100])
    _tamper(meta, arrays, dtype="float128")
    _tamper(meta, arrays, dtype="float16")
    _tamper(meta, arrays, encoding="magic")
    _tamper(meta, arrays, nnz=meta["nnz"] + 1)
    _tamper(meta, arrays, arrays=["mask"])
    with pytest.raises(ArtefactError, match="wrong size|expected"):
        decode_tensor(meta, {**arrays, "values": arrays["values"][:-4]}, name="w")
    bad = torch.tensor([2], dtype=torch.uint8)
    bmeta, barrays = encode_tensor(bad)
    with pytest.raises(ArtefactError, match="bool"):
        decode_tensor({**bmeta, "dtype": "bool"}, barrays)


def test_registry_has_builtins_and_rejects_duplicates() -> None:
    assert encoding_names()[:2] == ("dense", "bitmask")
    with pytest.raises(ValueError, match="already registered"):
        register_encoding("dense", lambda b, d: None, lambda m, a, n, dt: a["values"])


def _nibbles_encode(bits: np.ndarray, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Two 4-bit values per byte: what codebook indices would use."""
    if dtype != torch.uint8 or bits.size == 0 or bits.max() > 15:
        return None
    padded = np.concatenate([bits, np.zeros(bits.size % 2, dtype=np.uint8)])
    return {}, {"packed": (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)}


def _nibbles_decode(meta, arrays, numel, bits_dtype):  # type: ignore[no-untyped-def]
    packed = arrays["packed"]
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = packed & 15, packed >> 4
    return out[:numel]


def test_a_registered_encoding_is_used_on_request() -> None:
    if "test-nibbles" not in encoding_names():
        register_encoding("test-nibbles", _nibbles_encode, _nibbles_decode, auto=False)
    idx = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    meta, arrays = encode_tensor(idx, encoding="test-nibbles")
    assert meta["encoding"] == "test-nibbles" and stored_nbytes(arrays) == 18
    assert bits_equal(decode_tensor(meta, arrays), idx)
    assert encode_tensor(idx)[0]["encoding"] != "test-nibbles"  # not automatic
    with pytest.raises(ModelError, match="does not apply"):
        encode_tensor(torch.full((3,), 200, dtype=torch.uint8), encoding="test-nibbles")
