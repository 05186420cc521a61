"""``depth_tilt``: per-layer sparsities moved along the depth at the same total, against
hand-computed answers on tiny inputs."""

import pytest

from netpress.reconstruct.allocation import depth_tilt


def test_equal_blocks_get_a_symmetric_linear_ramp():
    # three blocks of two equal layers: +tilt, 0, -tilt, no shift needed
    s = depth_tilt([0.5, 0.4] * 3, [10, 10] * 3, [0, 0, 1, 1, 2, 2], 0.1)
    assert s == pytest.approx([0.6, 0.5, 0.5, 0.4, 0.4, 0.3])


def test_the_weighted_total_is_kept_with_unequal_sizes():
    base, sizes, depths = [0.5, 0.5, 0.6, 0.2], [100, 300, 50, 7], [0, 1, 2, 3]
    s = depth_tilt(base, sizes, depths, 0.05)
    total = sum(a * n for a, n in zip(s, sizes))
    assert total == pytest.approx(sum(a * n for a, n in zip(base, sizes)), abs=1e-9)
    # the ramp: differences between layers are the tilt's, whatever the shift
    ramp = [0.05, 0.05 / 3, -0.05 / 3, -0.05]
    shift = s[0] - base[0] - ramp[0]
    assert [a - b - shift for a, b in zip(s, base)] == pytest.approx(ramp)


def test_zero_tilt_one_depth_and_negative_tilt():
    assert depth_tilt([0.3, 0.7], [4, 9], [0, 5], 0.0) == pytest.approx([0.3, 0.7])
    assert depth_tilt([0.3, 0.7], [4, 4], [2, 2], 0.2) == pytest.approx([0.3, 0.7])
    assert depth_tilt([0.5, 0.5], [1, 1], [0, 1], -0.1) == pytest.approx([0.4, 0.6])


def test_out_of_range_and_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="smaller tilt"):
        depth_tilt([0.95, 0.5], [1, 1], [0, 1], 0.1)
    with pytest.raises(ValueError, match="same length"):
        depth_tilt([0.5], [1, 2], [0, 1], 0.1)
    with pytest.raises(ValueError, match="same length"):
        depth_tilt([], [], [], 0.1)
