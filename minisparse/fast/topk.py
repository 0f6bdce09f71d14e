"""Fast top-K: the same selections as minisparse/topk.py, from one sort and without the tie-break
where no tie can matter.

    fast.topk.sparsify(x, spec)   equals linear.sparsify(x, spec)       (xs exactly; tests/test_fast.py)
    fast.topk.topk_nonzero(x, k)  equals flatnonzero(topk_forward(x, k)[0])   (tests/test_topk.py)

Why faster: the reference builds the tie-broken mask (a cumsum over every row) and keeps it for
the backward. Under the straight-through estimator the backward needs no mask, and xs alone can
skip the tie-break: keeping every |x| >= t (t the K-th largest |x|) keeps more than K entries only
where entries tie with t. If t = 0 (a row of at most K nonzeros) the extra entries are zeros and
the row is x itself, found by counting its nonzeros, without a sort; ReLU2's exact zeros make this
the common case at the down projection. Only rows with ties at t > 0, rare for real-valued
activations, go through the reference topk_mask.
"""

from ..backend import array_module
from ..linear import sparsify as reference_sparsify
from ..nm import check_nm
from ..topk import kept_count, topk_mask


def kth_largest(a, k):
    """t, tied, both (..., 1), for a (..., D) = |x| (no entry negative) and 1 <= k < D: t is the
    k-th largest entry of each row, and tied says whether the next smaller entry equals t, i.e.
    whether a >= t keeps more than k entries (only then does the tie-break by index matter).

    A full sort rather than a partition: NumPy's vectorized sort is faster at these widths
    (benchmarks/RESULTS.md), and the sorted row gives `tied` without counting the kept entries.
    Floats are sorted as the integers of their bits (sort_key): the same order for |x|, and
    NumPy's integer sort skips the float sort's handling of NaN."""
    D = a.shape[-1]
    s = array_module(a).sort(sort_key(a), axis=-1).view(a.dtype)   # (..., D) ascending
    t = s[..., D - k:D - k + 1]
    return t, s[..., D - k - 1:D - k] == t


def sort_key(a):
    """a (no entry negative, no -0.0: an abs) as the signed integers of its bits, a view: for such
    floats the integers ascend as the floats do, +inf above every number and NaN (sign bit clear
    after abs) above +inf, where NumPy's float sort puts NaN too. Integer arrays are their own key."""
    if a.dtype.kind != "f":
        return a
    return a.view(f"i{a.dtype.itemsize}")


def topk_values(x, k):
    """xs = topk.topk_forward(x, k)[0], exactly (up to the sign of a zero), without the mask.
    An infinity is dropped only where infinities tie at t = inf: that row takes topk_mask.

    A row with at most k nonzeros keeps all of them (t = 0), so xs = x there and its sort is
    skipped: ReLU2's zeros make most rows of the down projection's input so. The rows are counted
    only where x holds a zero at all (a min of the sort keys, cheaper than counting)."""
    xp = array_module(x)
    D = x.shape[-1]
    if k >= D:
        return x
    if k <= 0:
        return xp.zeros_like(x)
    a = xp.abs(x)
    if bool(sort_key(a).min() == 0):                            # some entry is 0 (a NaN's key is large)
        over = row_nonzeros(a) > k                              # (...,) rows that drop a nonzero
        if not bool(over.all()):
            if not bool(over.any()):
                return x
            rows = xp.nonzero(over)
            xs = x.copy()
            xs[rows] = keep_kth_largest(x[rows], a[rows], k)    # (R, D)
            return xs
    return keep_kth_largest(x, a, k)


def row_nonzeros(a):
    """The nonzero entries of each row of a (..., D): (...,) ints. Sums the flags as bytes into
    small integers, which NumPy reduces faster than count_nonzero along an axis."""
    D = a.shape[-1]
    flags = (a != 0).view(array_module(a).uint8)
    return flags.sum(axis=-1, dtype="u2" if D < 2 ** 16 else "i8")


def keep_kth_largest(x, a, k):
    """x * topk_mask(x, k) for rows x (..., D) with a = |x|, up to the sign of a zero: every
    |x| >= t is kept (t the k-th largest), and only rows where the next smaller |x| ties with
    t > 0 go through the tie-broken topk_mask. xs is written into a's memory (a is used up)."""
    xp = array_module(x)
    t, tied = kth_largest(a, k)                                 # (..., 1), (..., 1)
    xs = xp.multiply(x, a >= t, out=a)                          # k entries kept, or more on ties
    excess = tied & (t > 0)                                     # (..., 1) rows whose ties matter
    if bool(excess.any()):
        rows = xp.nonzero(excess[..., 0])
        xs[rows] = xp.where(topk_mask(x[rows], k), x[rows], 0)      # (inf * False would be NaN)
    return xs


def sparsify(x, spec):
    """linear.sparsify(x, spec) for the training path: with the straight-through estimator
    top-K returns mask None (its backward never reads it); everything else is the reference."""
    if spec.nm is None and spec.sparsity != 0.0 and spec.ste:
        return topk_values(x, kept_count(x.shape[-1], spec.sparsity)), None
    return reference_sparsify(x, spec)


def topk_nonzero(x, k, block=None):
    """For one row x (D,): the ascending positions where x * topk_mask(x, k) is nonzero, i.e. the
    inputs a row-sparse product must read (fast/decode.py). With `block`, the top k of every block
    of `block` consecutive entries instead (N:M, nm.nm_mask).

    One sort of the (D / block, block) blocks gives each block's threshold t: a block keeps
    |x| >= t, without building a mask. Ties at t > 0 go through topk_mask, lower index first.
    Where t = 0 a block has fewer than k nonzeros and keeps them all (ReLU2's zeros are not read)."""
    xp = array_module(x)
    D = x.shape[0]
    if block is not None:
        check_nm(k, block, D)
    block = D if block is None else block
    a = xp.abs(x)
    if k <= 0:
        return xp.zeros(0, dtype=xp.int64)
    if k >= block:
        return a.nonzero()[0]
    ab = a.reshape(D // block, block)                           # (D/block, block)
    t, tied = kth_largest(ab, k)                                # (D/block, 1) each
    # count_nonzero: the cheapest reduction of these small flag arrays
    positive = bool(xp.count_nonzero(t) == t.size)              # else some t = 0: fewer than k nonzeros
    if bool(xp.count_nonzero(tied)) and (positive or bool((tied & (t > 0)).any())):   # ties at t > 0
        mask = topk_mask(x.reshape(D // block, block), k).reshape(D)
        return (mask & (a > 0)).nonzero()[0]
    keep = ab >= t                                              # (D/block, block)
    if not positive:                                            # t = 0: only the nonzeros are read
        keep &= ab > 0
    return keep.reshape(D).nonzero()[0]
