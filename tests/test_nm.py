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


def test_spec_kept_counts_what_each_token_keeps():
    """SparseSpec.kept, the nominal count behind N_a: keep of every block for N:M, K for top-K."""
    from minisparse.linear import SparseSpec
    assert SparseSpec(nm=(2, 4)).kept(16) == 8 and SparseSpec(nm=(3, 8)).kept(16) == 6
    assert SparseSpec(0.5).kept(16) == 8 and SparseSpec(0.3).kept(10) == 7 and SparseSpec().kept(16) == 16
    x = np.random.default_rng(0).normal(size=(5, 16))
    xs, _ = nm_forward(x, 3, 8)
    assert np.all((xs != 0).sum(axis=1) == SparseSpec(nm=(3, 8)).kept(16))
