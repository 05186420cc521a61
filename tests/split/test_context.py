"""The context-model arithmetic coder: exact round trips, near-ideal size, its maths checked by
brute force, and a clear saving on codes with a dependency the per-channel model cannot see."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from netpress.errors import DataError, RecipeError
from netpress.split import (
    arith_bytes,
    context_bytes,
    decode_with_context,
    encode_with_context,
    fit_code_model,
    fit_context_model,
    load_context_model,
    save_context_model,
)

LEFT, UP, PREV = (0, 0, -1), (0, -1, 0), (-1, 0, 0)


def _planted(rng: np.random.Generator, n: int, shape: tuple[int, int, int], bits: int,
             copy: float = 0.8) -> np.ndarray:
    """Codes whose value repeats its left neighbour's with probability ``copy``, else is
    uniform: every channel's marginal is uniform, so a per-channel model saves nothing."""
    a = rng.integers(0, 2 ** bits, (n, *shape))
    for j in range(1, shape[2]):
        keep = rng.random((n, shape[0], shape[1])) < copy
        a[..., j] = np.where(keep, a[..., j - 1], a[..., j])
    return a.astype(np.uint8)


@pytest.mark.parametrize("bits,shape,offsets", [
    (2, (4, 8, 8), (LEFT, UP, PREV)), (3, (3, 5, 7), (LEFT, PREV)), (1, (2, 4, 4), ()),
    (4, (2, 3, 3), (UP, (-1, 1, 1)))])
def test_round_trip_and_length_within_a_byte_of_the_ideal(bits, shape, offsets):
    rng = np.random.default_rng(bits)
    train = rng.integers(0, 2 ** bits, (300, *shape)).astype(np.uint8)
    model = fit_context_model(train, bits, offsets)
    for codes in rng.integers(0, 2 ** bits, (15, *shape)).astype(np.uint8):
        data = encode_with_context(codes, model)
        assert np.array_equal(decode_with_context(data, model), codes)
        ideal = model.ideal_bits(codes)
        assert math.floor(ideal / 8) - 1 <= len(data) <= math.ceil((ideal + 2) / 8) + 1


def test_planted_dependency_round_trips_and_costs_far_less_than_per_channel():
    rng = np.random.default_rng(0)
    shape = (4, 6, 8)
    train, test = _planted(rng, 3000, shape, 2), _planted(rng, 40, shape, 2)
    ctx = fit_context_model(train, 2, (LEFT, UP, PREV))
    flat = fit_code_model(list(train), 2)
    for codes in test:
        assert np.array_equal(decode_with_context(encode_with_context(codes, ctx), ctx), codes)
    sent_ctx, sent_flat = context_bytes(list(test), ctx), arith_bytes(list(test), flat)
    # per-channel: ~2 bits a value (48 B); context: H(copy 0.8 of uniform 4) ~1.2 bits a value
    assert sent_flat.mean() > 46
    assert sent_ctx.mean() < 0.7 * sent_flat.mean()
    assert ctx.nbytes == 2 * 4 * 5 ** 3 * 4


def test_ideal_bits_equal_a_brute_force_sum_of_minus_log2_p():
    rng = np.random.default_rng(3)
    bits, shape, offsets, strength = 2, (2, 3, 3), (LEFT, PREV), 1.5
    symbols, total = 4, 2 ** 15
    train = rng.integers(0, symbols, (40, *shape)).astype(np.uint8)
    model = fit_context_model(train, bits, offsets, strength=strength)

    def neighbours(x: np.ndarray, c: int, i: int, j: int) -> tuple[int, ...]:
        out = []
        for dc, di, dj in offsets:
            cc, ii, jj = c + dc, i + di, j + dj
            inside = 0 <= cc < shape[0] and 0 <= ii < shape[1] and 0 <= jj < shape[2]
            out.append(int(x[cc, ii, jj]) if inside else symbols)
        return tuple(out)

    def prob(c: int, ctx: tuple[int, ...], s: int) -> float:
        chan = np.ones(symbols)  # Laplace-smoothed channel counts
        n = np.zeros(symbols)
        for x in train:
            for i, j in itertools.product(range(shape[1]), range(shape[2])):
                chan[x[c, i, j]] += 1
                if neighbours(x, c, i, j) == ctx:
                    n[x[c, i, j]] += 1
        p = (n + strength * chan / chan.sum()) / (n.sum() + strength)
        freq = np.maximum(1, np.floor(p * (total - symbols)))
        return float(freq[s] / freq.sum())

    codes = rng.integers(0, symbols, shape).astype(np.uint8)
    brute = sum(-math.log2(prob(c, neighbours(codes, c, i, j), int(codes[c, i, j])))
                for c, i, j in itertools.product(*(range(n) for n in shape)))
    assert model.ideal_bits(codes) == pytest.approx(brute, rel=1e-12)


def test_unseen_contexts_fall_back_to_the_channel_pmf():
    train = np.zeros((50, 1, 2, 4), np.uint8)
    train[:, :, :, 2:] = 1  # left-neighbour contexts seen: border, 0 and 1, never 2 or 3
    model = fit_context_model(train, 2, (LEFT,), strength=2.0)
    unseen = np.diff(model.cum[0, 3]) / model.cum[0, 3, -1]  # after a 3
    channel = np.array([201, 201, 1, 1]) / 404  # Laplace-smoothed channel counts
    assert np.allclose(unseen, channel, atol=1e-3)
    codes = np.array([[[3, 3, 2, 3], [0, 1, 2, 3]]], np.uint8)  # round trips all the same
    assert np.array_equal(decode_with_context(encode_with_context(codes, model), model), codes)


def test_strength_is_chosen_on_held_out_codes():
    rng = np.random.default_rng(5)
    deterministic = _planted(rng, 2000, (2, 4, 6), 2, copy=1.0)  # counts are all that matter
    assert fit_context_model(deterministic, 2, (LEFT,)).strength <= 1.0
    noise = rng.integers(0, 4, (60, 2, 4, 6)).astype(np.uint8)  # contexts carry nothing
    assert fit_context_model(noise, 2, (LEFT, UP, PREV)).strength >= 8.0


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    model = fit_context_model(_planted(rng, 200, (3, 4, 4), 3), 3, (LEFT, UP))
    path = save_context_model(model, tmp_path / "ctx.json")
    loaded = load_context_model(path)
    assert (loaded.bits, loaded.shape, loaded.offsets) == (model.bits, model.shape,
                                                           model.offsets)
    assert np.array_equal(loaded.cum, model.cum)
    codes = _planted(rng, 1, (3, 4, 4), 3)[0]
    assert encode_with_context(codes, loaded) == encode_with_context(codes, model)
    (tmp_path / "bad.json").write_text('{"type": "netpress.split.CodeModel", "version": 1}')
    with pytest.raises(DataError, match="not a context model"):
        load_context_model(tmp_path / "bad.json")


def test_bad_codes_and_offsets_are_refused():
    model = fit_context_model(np.zeros((5, 2, 3, 3), np.uint8), 2, (LEFT,))
    with pytest.raises(DataError, match=r"\[0, 3\]"):
        encode_with_context(np.full((2, 3, 3), 4, np.uint8), model)
    with pytest.raises(DataError, match="model's shape"):
        encode_with_context(np.zeros((3, 3, 3), np.uint8), model)
    with pytest.raises(DataError, match="model's shape"):
        model.ideal_bits(np.zeros((2, 9), np.uint8))
    with pytest.raises(DataError, match="integers"):
        encode_with_context(np.zeros((2, 3, 3), np.float32), model)
    with pytest.raises(DataError, match="no codes"):
        fit_context_model([], 2)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        fit_context_model(np.zeros((5, 6), np.uint8), 2)
    with pytest.raises(DataError, match="different shapes"):
        fit_context_model([np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 4), np.uint8)], 2)
    with pytest.raises(RecipeError, match="before the coded value"):
        fit_context_model(np.zeros((5, 2, 3, 3), np.uint8), 2, ((0, 0, 1),))
