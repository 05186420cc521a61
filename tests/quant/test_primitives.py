"""Affine quantize/dequantize maths: property tests on the round trip and the parameters."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netpress.quant.primitives import (
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    minmax,
    qrange,
    quantize_affine,
    sqnr,
)

bits_st = st.integers(2, 8)
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def tensors(draw, min_size=1, max_size=64):
    values = draw(st.lists(finite, min_size=min_size, max_size=max_size))
    return torch.tensor(values, dtype=torch.float32)


def _clip_range(scale, zp, qmin, qmax):
    return (qmin - zp.float()) * scale, (qmax - zp.float()) * scale


@settings(max_examples=200, deadline=None)
@given(x=tensors(), bits=bits_st, symmetric=st.booleans())
def test_round_trip_error_within_half_a_step(x, bits, symmetric):
    lo, hi = minmax(x)
    scale, zp = choose_qparams(lo, hi, bits, symmetric=symmetric)
    qmin, qmax = qrange(bits, symmetric=symmetric)
    q = quantize_affine(x, scale, zp, bits, symmetric=symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    dq = dequantize_affine(q, scale, zp)
    clip_lo, clip_hi = _clip_range(scale, zp, qmin, qmax)
    inside = (x >= clip_lo) & (x <= clip_hi)
    tol = scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool(((dq - x).abs() <= tol)[inside].all())
    # the whole observed range is covered up to one step (the zero point is rounded)
    assert bool(((dq - x).abs() <= scale * (1 + 1e-5) + 1e-6 * x.abs()).all())


@settings(max_examples=100, deadline=None)
@given(x=tensors(), bits=bits_st, symmetric=st.booleans())
def test_zero_is_exact_and_symmetric_zero_point_is_zero(x, bits, symmetric):
    scale, zp = choose_qparams(*minmax(x), bits, symmetric=symmetric)
    qmin, qmax = qrange(bits, symmetric=symmetric)
    assert bool(((zp >= qmin) & (zp <= qmax)).all())
    if symmetric:
        assert int(zp) == 0
    zero = torch.zeros(3)
    dq = dequantize_affine(quantize_affine(zero, scale, zp, bits, symmetric=symmetric), scale, zp)
    assert torch.equal(dq, zero)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), bits=bits_st, symmetric=st.booleans(),
       seed=st.integers(0, 10_000))
def test_per_channel_and_fake_quant_match_quant_dequant(rows, cols, bits, symmetric, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    for axis in (0, 1):
        scale, zp = choose_qparams(*minmax(x, axis=axis), bits, symmetric=symmetric)
        q = quantize_affine(x, scale, zp, bits, symmetric=symmetric, axis=axis)
        dq = dequantize_affine(q, scale, zp, axis=axis)
        step = scale.reshape([-1 if d == axis else 1 for d in range(2)])
        assert bool(((dq - x).abs() <= step * (1 + 1e-5)).all())
        fq = fake_quantize(x, scale, zp, bits, symmetric=symmetric, axis=axis)
        assert torch.equal(fq, dq)


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 4), group_size=st.sampled_from([2, 4, 8]), bits=bits_st,
       seed=st.integers(0, 10_000))
def test_per_group(groups, group_size, bits, seed):
    x = torch.randn(3, groups * group_size, generator=torch.Generator().manual_seed(seed))
    lo, hi = minmax(x, group_size=group_size)
    assert lo.shape == (3, groups)
    scale, zp = choose_qparams(lo, hi, bits)
    dq = fake_quantize(x, scale, zp, bits, group_size=group_size)
    step = scale.repeat_interleave(group_size, dim=-1)
    assert bool(((dq - x).abs() <= step * (1 + 1e-5)).all())


def test_fake_quantize_gradients_are_straight_through_and_clipped():
    x = torch.tensor([-3.0, -0.4, 0.2, 0.9, 5.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(0, dtype=torch.int32)
    y = fake_quantize(x, scale, zp, 4, symmetric=True)  # range [-0.7, 0.7]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert scale.grad is not None and float(scale.grad) != 0.0  # LSQ gradient reaches scale


def test_more_bits_less_error():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(2, 9):
        scale, zp = choose_qparams(*minmax(x), bits)
        errors.append(sqnr(x, fake_quantize(x, scale, zp, bits)))
    assert errors == sorted(errors)
    assert errors[-1] > 38  # 8-bit on a Gaussian: ~6 dB per bit


def test_bad_bits_and_shapes_are_refused():
    with pytest.raises(ValueError, match="bits"):
        qrange(9, symmetric=False)
    with pytest.raises(ValueError, match="bits"):
        qrange(1, symmetric=True)
    with pytest.raises(ValueError, match="group_size"):
        minmax(torch.zeros(2, 5), group_size=2)
    with pytest.raises(ValueError, match="axis"):
        quantize_affine(torch.zeros(2, 3), torch.ones(2), torch.zeros(2), 8)


def test_all_zero_tensor_has_finite_parameters():
    scale, zp = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert float(scale) > 0 and int(zp) == 0
    assert torch.equal(fake_quantize(torch.zeros(4), scale, zp, 8), torch.zeros(4))
