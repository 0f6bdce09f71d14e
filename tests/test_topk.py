"""Top-K and N:M masks against an independent top-K (a stable sort), and the straight-through
estimator by its definition. Finite differences cannot check STE gradients: they are not
derivatives of the forward, so the test is the equation itself (Eq. 12, 13)."""

import numpy as np
import pytest

from conftest import row_kinds
from minisparse.errors import UsageError
from minisparse.linear import SparseSpec, sparse_linear_backward, sparse_linear_forward, sparsify, zero_fraction
from minisparse.fast.topk import kth_largest, row_nonzeros, sort_key, topk_nonzero, topk_values
from minisparse.nm import nm_mask
from minisparse.topk import kept_count, topk_backward, topk_forward, topk_mask


def reference_topk_mask(x, k):
    """Independent top-K: stable sort of -|x| per row, keep the first k (lower index wins ties)."""
    x2 = x.reshape(-1, x.shape[-1])
    mask = np.zeros(x2.shape, dtype=bool)
    order = np.argsort(-np.abs(x2), axis=-1, kind="stable")
    for r in range(x2.shape[0]):
        mask[r, order[r, :k]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("k", [0, 1, 5, 12, 23, 24])
def test_topk_mask_equals_independent_topk(k):
    rng = np.random.default_rng(k)
    for kind, x in row_kinds(rng):
        mask = topk_mask(x, k)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, reference_topk_mask(x, k), err_msg=kind)
        assert (mask.sum(axis=-1) == k).all(), kind           # never more (or fewer) than K


@pytest.mark.parametrize("k", [0, 1, 5, 12, 23, 24])
def test_topk_values_equal_x_times_the_exact_mask(k):
    """fast.topk.topk_values, the training path's shortcut (no tie-broken mask), gives exactly
    x * mask, ties included."""
    rng = np.random.default_rng(100 + k)
    for kind, x in row_kinds(rng):
        want = x * reference_topk_mask(x, k)
        np.testing.assert_array_equal(topk_values(x, k), want, err_msg=kind)
        assert (topk_values(x, k) != 0).sum(axis=-1).max() <= k, kind
    x3 = rng.integers(-3, 4, size=(3, 5, 16)).astype(np.float32)          # ties at t > 0, 3-d
    np.testing.assert_array_equal(topk_values(x3, 6), x3 * reference_topk_mask(x3, 6))


def test_topk_values_skips_rows_of_few_nonzeros_exactly():
    """topk_values sorts only the rows with more than k nonzeros; the others are x. In one 3-d batch:
    rows of few nonzeros (an inf among them), rows of many with ties at t > 0, rows of many with
    none (one of them k + 1); then a batch where no row has more than k (xs is x), and one without
    any zero."""
    rng = np.random.default_rng(5)
    k = 6
    few = np.where(np.arange(16) % 3 == 0, rng.standard_normal((4, 16)), 0.0)           # 6 nonzeros
    few[0, 3] = np.inf
    ties = rng.integers(1, 3, size=(4, 16)) * rng.choice([-1.0, 1.0], size=(4, 16))
    many = rng.standard_normal((4, 16))
    many[0, k + 1:] = 0.0                                               # k + 1 nonzeros: drops one
    x = np.stack([few, ties, many]).astype(np.float32)                  # (3, 4, 16)
    counts = row_nonzeros(np.abs(x))
    np.testing.assert_array_equal(counts, np.count_nonzero(x, axis=-1))
    assert (counts[0] <= k).all() and (counts[1:] > k).all()
    np.testing.assert_array_equal(topk_values(x, k), np.where(reference_topk_mask(x, k), x, 0))
    np.testing.assert_array_equal(topk_values(few, k), few)
    np.testing.assert_array_equal(topk_values(many, k), np.where(reference_topk_mask(many, k), many, 0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kth_largest_sorts_the_bits_as_the_float_sort_would(dtype):
    """kth_largest sorts |x| as integers (sort_key): t and tied must be those of NumPy's float sort,
    for rows holding zeros (-0.0 too), subnormals, the largest finite value, inf and NaN."""
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny, 1.0, -1.0,
                        info.max, -info.max, np.inf, -np.inf, np.nan], dtype=dtype)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.choice(special, size=(200, 16)),
                           rng.standard_normal((20, 16)).astype(dtype)])
    a = np.abs(rows)
    s = np.sort(a, axis=-1)                                     # the float sort: NaN last
    assert np.isnan(s[:, -1]).sum() > 100 and np.isinf(s).any() and (s == 0).any()
    np.testing.assert_array_equal(np.sort(sort_key(a), axis=-1).view(dtype), s)
    for k in (1, 5, 8, 15):
        t, tied = kth_largest(a, k)
        np.testing.assert_array_equal(t, s[:, 16 - k:17 - k])
        np.testing.assert_array_equal(tied, s[:, 15 - k:16 - k] == s[:, 16 - k:17 - k])


@pytest.mark.parametrize("k", [0, 1, 5, 12, 23, 24])
def test_topk_nonzero_are_the_nonzero_kept_positions(k):
    """fast.topk.topk_nonzero, the decode path's selection: exactly the positions where x * mask is
    nonzero, ascending."""
    rng = np.random.default_rng(200 + k)
    for kind, x in row_kinds(rng):
        for row in x:
            want = np.flatnonzero(row * reference_topk_mask(row[None], k)[0])
            got = topk_nonzero(row, k)
            np.testing.assert_array_equal(got, want, err_msg=kind)
            assert got.dtype.kind == "i"


def test_topk_uses_magnitude_not_sign():
    x = np.array([[-9.0, 1.0, 2.0, -0.5]])
    np.testing.assert_array_equal(topk_mask(x, 2), [[True, False, True, False]])


def test_topk_rows_are_independent():
    # each row keeps its own entries (not the union of all rows' indices, QSPARSE.md Sec. 8)
    x = np.array([[5.0, 0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 5.0]])
    np.testing.assert_array_equal(topk_mask(x, 1), [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_topk_ties_break_by_lower_index():
    x = np.array([[1.0, -1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(topk_mask(x, 2), [[True, True, False, False, False]])


def test_topk_batched_3d():
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(3, 5, 16)).astype(np.float32)
    np.testing.assert_array_equal(topk_mask(x, 6), reference_topk_mask(x, 6))


@pytest.mark.parametrize("D,S,K", [(128, 0.5, 64), (10, 0.3, 7), (10, 0.25, 7), (7, 0.0, 7), (64, 0.99, 1)])
def test_kept_count(D, S, K):
    assert kept_count(D, S) == K


@pytest.mark.parametrize("S", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_impossible_sparsity_is_a_usage_error(S):
    with pytest.raises(UsageError, match="sparsity"):
        kept_count(16, S)


def test_ste_backward_is_identity_and_masked_is_upstream_times_mask():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 20))
    xs, mask = topk_forward(x, 7)
    np.testing.assert_array_equal(xs, np.where(mask, x, 0.0))
    dxs = rng.standard_normal(x.shape)
    assert np.array_equal(topk_backward(dxs, mask, ste=True), dxs)           # Eq. 13
    assert np.array_equal(topk_backward(dxs, mask, ste=False), dxs * mask)   # Eq. 12


@pytest.mark.parametrize("keep,block", [(0, 4), (1, 4), (2, 4), (4, 4), (3, 8), (16, 32)])
def test_nm_keeps_exactly_keep_per_block(keep, block):
    rng = np.random.default_rng(keep * 100 + block)
    D = 64
    for kind, x in row_kinds(rng, N=5, D=D):
        mask = nm_mask(x, keep, block)
        per_block = mask.reshape(5, D // block, block).sum(axis=-1)
        assert (per_block == keep).all(), kind
        ref = reference_topk_mask(x.reshape(5, D // block, block), keep).reshape(x.shape)
        np.testing.assert_array_equal(mask, ref, err_msg=kind)


@pytest.mark.parametrize("keep,block", [(0, 4), (1, 4), (2, 4), (4, 4), (3, 8), (16, 32), (8, 32)])
def test_nm_nonzero_are_the_nonzero_kept_positions(keep, block):
    """Block Q-Sparse's decode selection: exactly where x * nm_mask is nonzero, ascending; rows of
    ties (broken by index), ReLU2 zeros (blocks with fewer than `keep` nonzeros) and constant rows."""
    rng = np.random.default_rng(300 + 10 * keep + block)
    for kind, x in row_kinds(rng, N=6, D=64):
        for row in x:
            want = np.flatnonzero(row * reference_topk_mask(row.reshape(64 // block, block), keep).reshape(64))
            got = topk_nonzero(row, keep, block)
            np.testing.assert_array_equal(got, want, err_msg=kind)
            assert got.dtype.kind == "i"
            assert np.bincount(got // block, minlength=64 // block).max(initial=0) <= keep


@pytest.mark.parametrize("keep,block,D", [(5, 4, 16), (2, 5, 16), (-1, 4, 16), (2, 0, 16)])
def test_impossible_nm_is_a_usage_error(keep, block, D):
    with pytest.raises(UsageError, match="N:M"):
        nm_mask(np.zeros((2, D)), keep, block)


def test_dense_spec_costs_nothing():
    x = np.ones((2, 3, 8))
    xs, mask = sparsify(x, SparseSpec(0.0))
    assert xs is x and mask is None                                     # no copy, no mask


@pytest.mark.parametrize("spec", [SparseSpec(0.5), SparseSpec(0.25, ste=False), SparseSpec(0.0, nm=(2, 4)),
                                  SparseSpec(0.0, nm=(1, 4), ste=False)])
def test_sparse_linear_backward_by_definition(spec):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16))
    W1, W2 = rng.standard_normal((6, 16)), rng.standard_normal((3, 16))
    (y1, y2), cache = sparse_linear_forward(x, [W1, W2], spec)
    xs, mask = sparsify(x, spec)
    np.testing.assert_allclose(y1, xs @ W1.T, rtol=1e-12)
    np.testing.assert_allclose(y2, xs @ W2.T, rtol=1e-12)
    assert zero_fraction(cache) == pytest.approx((xs == 0).mean())     # measured sparsity
    dy1, dy2 = rng.standard_normal(y1.shape), rng.standard_normal(y2.shape)
    dx, (dW1, dW2) = sparse_linear_backward([dy1, dy2], cache)
    dxs = dy1 @ W1 + dy2 @ W2                                         # upstream of the sparsify
    expected = dxs if spec.ste else dxs * mask
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW1, dy1.reshape(-1, 6).T @ xs.reshape(-1, 16), rtol=1e-12)
    np.testing.assert_allclose(dW2, dy2.reshape(-1, 3).T @ xs.reshape(-1, 16), rtol=1e-12)


def test_dropped_infinities_become_zero_not_nan():
    """More infinities than k tie at the threshold; the dropped ones must give 0 (inf * 0 would be NaN)."""
    x = np.array([[np.inf, 1.0, -np.inf, 2.0, np.inf]])
    want = np.array([[np.inf, 0.0, -np.inf, 0.0, 0.0]])                 # k = 2: the first two infinities
    np.testing.assert_array_equal(topk_values(x, 2), want)
    np.testing.assert_array_equal(topk_forward(x, 2)[0], want)
    np.testing.assert_array_equal(topk_nonzero(x[0], 2), [0, 2])
