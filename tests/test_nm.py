"""nm_forward (Block Q-Sparse's forward) on infinities: an infinity that is kept stays itself, one
that is dropped (a block holding more infinities than `keep`, ties by lower index) gives 0, never
NaN (inf * False is NaN, so x * mask would not do). The masks themselves are tested in test_topk.py."""

import numpy as np
import pytest

from minisparse.nm import nm_forward, nm_mask


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropped_infinity_is_zero_not_nan(dtype):
    """keep=2, block=4: the first block has three infinities; the first two by index are kept, the
    third is dropped and must come out as 0."""
    inf = np.inf
    x = np.array([[inf, 1.0, -inf, inf, 3.0, -2.0, 0.5, 1.0]], dtype=dtype)
    want = np.array([[inf, 0.0, -inf, 0.0, 3.0, -2.0, 0.0, 0.0]], dtype=dtype)
    xs, mask = nm_forward(x, 2, 4)
    assert xs.dtype == dtype
    assert not np.isnan(xs).any()
    np.testing.assert_array_equal(xs, want)
    np.testing.assert_array_equal(mask, nm_mask(x, 2, 4))
    np.testing.assert_array_equal(mask, want != 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kept_infinity_stays_infinite(dtype):
    """keep=2, block=4: one infinity per block, kept beside the next largest |x| (a guard that the
    fix zeroes only dropped entries); a second row with two infinities in a block, both kept."""
    inf = np.inf
    x = np.array([[1.0, inf, -2.0, 0.5, -inf, 0.0, 0.0, 4.0],
                  [-inf, 5.0, 6.0, inf, 0.0, -1.0, 2.0, 0.0]], dtype=dtype)
    want = np.array([[0.0, inf, -2.0, 0.0, -inf, 0.0, 0.0, 4.0],
                     [-inf, 0.0, 0.0, inf, 0.0, -1.0, 2.0, 0.0]], dtype=dtype)
    xs, mask = nm_forward(x, 2, 4)
    assert xs.dtype == dtype
    assert not np.isnan(xs).any()
    np.testing.assert_array_equal(xs, want)
    np.testing.assert_array_equal(mask, want != 0)
