"""The AVX2 u8×s8 kernel emulation and the pair bound, against brute force on tiny tensors."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netpress.quant.saturation import (
    INT16_MAX,
    INT16_MIN,
    conv2d_u8s8,
    from_kernel_rows,
    kernel_rows,
    limit_pairs,
    pair_limit,
    pair_safe_scale,
    saturating_pairs,
    u8s8_matmul,
)


def _brute_matmul(a, b, saturate):
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n), dtype=np.int64)
    for i, j in itertools.product(range(m), range(n)):
        total = 0
        for p in range(0, k, 2):
            pair = int(a[i, p]) * int(b[p, j])
            if p + 1 < k:
                pair += int(a[i, p + 1]) * int(b[p + 1, j])
            total += min(max(pair, INT16_MIN), INT16_MAX) if saturate else pair
        out[i, j] = total
    return out


def _big_codes(rng, shape):
    """int8 codes with many large same-sign neighbours (what makes pairs saturate)."""
    w = rng.integers(-40, 41, size=shape)
    big = rng.random(shape) < 0.4
    w[big] = rng.choice([-1, 1], size=big.sum()) * rng.integers(90, 128, size=big.sum())
    return w.astype(np.int8)


@pytest.mark.parametrize("k", [1, 6, 7, 20])
def test_matmul_matches_brute_force(k):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, size=(5, k)).astype(np.uint8)
    b = _big_codes(rng, (k, 4))
    for saturate in (True, False):
        np.testing.assert_array_equal(u8s8_matmul(a, b, saturate=saturate),
                                      _brute_matmul(a, b, saturate))
    np.testing.assert_array_equal(u8s8_matmul(a, b, saturate=False),
                                  a.astype(np.int64) @ b.astype(np.int64))


def test_matmul_saturates_pairs_of_large_products():
    a = np.full((1, 4), 250, dtype=np.uint8)
    b = np.array([[120], [120], [-120], [-120]], dtype=np.int8)
    # each pair 60,000 clips to +32767 and -32768: the sum is -1 instead of 0
    assert int(u8s8_matmul(a, b)[0, 0]) == INT16_MAX + INT16_MIN
    assert int(u8s8_matmul(a, b, saturate=False)[0, 0]) == 0
    with pytest.raises(TypeError, match="uint8"):
        u8s8_matmul(a.astype(np.int8), b)


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups", [
    (3, 4, 3, 1, 1, 1, 1), (4, 6, 3, 2, 1, 1, 2), (2, 2, 1, 1, 0, 1, 1), (4, 4, 3, 1, 2, 2, 1),
    (4, 4, 3, 1, 1, 1, 4)])
def test_conv_matches_brute_force(cin, cout, k, stride, pad, dil, groups):
    rng = np.random.default_rng(cin * 10 + groups)
    x = rng.integers(120, 256, size=(2, cin, 5, 5)).astype(np.uint8)
    w = _big_codes(rng, (cout, cin // groups, k, k))
    kw = {"stride": (stride,) * 2, "padding": (pad,) * 2, "dilation": (dil,) * 2,
          "groups": groups}
    exact = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), **kw)
    np.testing.assert_array_equal(conv2d_u8s8(x, w, saturate=False, **kw), exact.numpy())
    # saturating: each output is a brute-force pairwise sum over the channels-last patch
    sat = conv2d_u8s8(x, w, saturate=True, **kw)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    og, cg = cout // groups, cin // groups
    depthwise = cg == 1 and og == 1
    for n, o in itertools.product(range(2), range(cout)):
        g = o // og
        for i, j in itertools.product(range(sat.shape[2]), range(sat.shape[3])):
            patch = xp[n, g * cg:(g + 1) * cg, i * stride:i * stride + dil * (k - 1) + 1:dil,
                       j * stride:j * stride + dil * (k - 1) + 1:dil]
            a = patch.transpose(1, 2, 0).reshape(1, -1)
            b = w[o].transpose(1, 2, 0).reshape(-1, 1)
            assert sat[n, o, i, j] == _brute_matmul(a, b, not depthwise)[0, 0]
    assert depthwise or (sat != exact.numpy()).any()  # these weights do saturate


def test_kernel_rows_are_channels_last_and_invert():
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    rows = kernel_rows(w)
    assert rows.shape == (2, 12)
    assert rows[0, :3].tolist() == [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0]]
    assert torch.equal(from_kernel_rows(rows, w.shape), w)
    lin = torch.arange(6).reshape(2, 3)
    assert torch.equal(kernel_rows(lin), lin) and torch.equal(from_kernel_rows(lin, (2, 3)), lin)


def test_saturating_pairs_matches_the_corners_of_the_activation_box():
    rng = np.random.default_rng(0)
    rows = _big_codes(rng, (6, 9))
    count = saturating_pairs(rows)
    for r in range(6):
        # a pair's sum is linear in (a0, a1): its extremes are at the corners of [0, 255]^2
        corners = np.array(list(itertools.product([0, 255], repeat=2)), dtype=np.uint8)
        brute = 0
        for p in range(0, 9, 2):
            w = rows[r, p:p + 2].astype(np.int64)
            sums = corners[:, :len(w)].astype(np.int64) @ w
            brute += int((sums > INT16_MAX).any() or (sums < INT16_MIN).any())
        assert count[r] == brute
    assert pair_limit(255) == 128 and pair_limit(127) == 258


def test_pair_safe_scale_rounds_to_safe_codes():
    torch.manual_seed(0)
    w = torch.randn(32, 50)
    w[:, :2] = torch.tensor([1.0, 0.9])  # a large same-sign pair in every row
    base = w.abs().amax(1) / 127
    scale = pair_safe_scale(w, base, 128)
    assert (scale >= base).all() and (scale <= 2 * base).all()
    codes = torch.round(w / scale[:, None]).clamp(-127, 127)
    assert not saturating_pairs(codes.to(torch.int8)).any()
    # rows whose pairs are safe keep their scale
    safe = torch.tensor([[1.0, -1.0, 0.1, 0.1]])
    assert torch.equal(pair_safe_scale(safe, safe.abs().amax(1) / 127, 128), torch.tensor(
        [1.0 / 127]))


def test_limit_pairs_cuts_exactly_the_excess():
    codes = torch.tensor([[120, 100, -90, -80, 127, -127, 5, 7, 127]], dtype=torch.int8)
    # excess 92 → 46 + 46; excess 42 → 21 + 21; opposite signs and small pairs stay
    out = limit_pairs(codes, 128)
    assert out.tolist() == [[74, 54, -69, -59, 127, -127, 5, 7, 127]]
    assert not saturating_pairs(out).any()
    again = limit_pairs(out, 128)
    assert torch.equal(again, out)  # a projection: safe codes are unchanged
    rng = np.random.default_rng(1)
    rand = torch.from_numpy(_big_codes(rng, (16, 31)))
    cut = limit_pairs(rand, 128)
    assert not saturating_pairs(cut).any()
    assert ((cut.long() - rand.long()).abs() <= rand.long().abs()).all()  # toward zero only
    assert (cut.long() * rand.long() >= 0).all()  # no sign flips
