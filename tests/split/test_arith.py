"""The static arithmetic coder of the bottleneck's codes: exact round trips, near-ideal size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from netpress.errors import DataError
from netpress.split.arith import arith_bytes, decode_codes, encode_codes, fit_code_model


@pytest.mark.parametrize("bits,shape", [(2, (4, 8, 8)), (3, (3, 5, 7)), (4, (1, 16)),
                                        (8, (2, 3, 3))])
def test_round_trip_and_length_within_a_byte_of_the_ideal(bits, shape):
    rng = np.random.default_rng(bits)
    symbols = 2 ** bits
    p = rng.dirichlet(np.full(symbols, 0.5), size=shape[0])  # skewed, per channel

    def draw() -> np.ndarray:
        rows = [rng.choice(symbols, int(np.prod(shape[1:])), p=pc) for pc in p]
        return np.stack(rows).reshape(shape).astype(np.uint8)

    model = fit_code_model([draw() for _ in range(200)], bits)
    for _ in range(20):
        codes = draw()
        data = encode_codes(codes, model)
        assert np.array_equal(decode_codes(data, model, shape), codes)
        ideal = model.ideal_bits(codes)  # brute-force sum of -log2 p over the values
        assert len(data) <= math.ceil((ideal + 2) / 8) + 1
        assert len(data) >= math.floor(ideal / 8) - 1


def test_unseen_codes_still_round_trip_and_cost_more():
    model = fit_code_model([np.zeros((2, 6), dtype=np.uint8)] * 50, 2)
    common, rare = np.zeros((2, 6), np.uint8), np.full((2, 6), 3, np.uint8)
    for codes in (common, rare):
        assert np.array_equal(decode_codes(encode_codes(codes, model), model, (2, 6)), codes)
    sizes = arith_bytes([common, rare], model)
    assert sizes[0] <= 1 < sizes[1]
    assert model.nbytes == 2 * 2 * 4


def test_bad_codes_are_refused():
    model = fit_code_model([np.zeros((2, 6), dtype=np.uint8)], 2)
    with pytest.raises(DataError, match="range"):
        encode_codes(np.full((2, 6), 4, np.uint8), model)
    with pytest.raises(DataError, match="channels"):
        encode_codes(np.zeros((3, 6), np.uint8), model)
    with pytest.raises(DataError, match="no codes"):
        fit_code_model([], 2)
