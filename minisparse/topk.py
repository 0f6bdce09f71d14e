"""Top-K sparsification with the straight-through estimator (Q-Sparse, Sec. 2.1-2.2).

Forward (Eq. 2-3), per token, along the channel axis:

    xs = x * mask,     mask = TopK(|x|)          x, mask, xs: (N, D)  (any leading dims)

`mask` is 1 at exactly K entries of each row, those of largest |x|, and 0 elsewhere.
Ties are broken by position: among entries with equal |x| the lower channel index is
kept, so a row never keeps more than K (a `>=` threshold would, see QSPARSE.md Sec. 8).

Sparsity S is the fraction of each row that is zeroed:

    K = D - floor(S * D + 1/2)        (S = 0 keeps all D; S = 0.5 with D = 128 keeps 64)

Backward:
    straight-through estimator (Eq. 13):   dx = dxs            (all D entries)
    masked gradient, the ablation (Eq. 12): dx = dxs * mask
"""

import math

from .backend import array_module
from .errors import UsageError


def kept_count(D, sparsity):
    """K, the number of the D channels kept at this sparsity (see the formula above)."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise UsageError(f"sparsity {sparsity!r} is not allowed: it is the fraction of inputs zeroed, "
                         "a number in [0, 1) (0 = dense).")
    return D - int(math.floor(sparsity * D + 0.5))


def kth_largest(a, k):
    """t, tied, both (..., 1), for a (..., D) and 1 <= k < D: t is the k-th largest entry of
    each row, and tied says whether the next smaller entry equals t, i.e. whether a >= t keeps
    more than k entries (only then does the tie-breaking by index matter).

    Why a full sort, when partition is O(D) and a sort O(D log D): measured on 768 rows
    (2-core Xeon, NumPy 2.4), NumPy's vectorized sort is faster at these widths, 130 against
    217 us for D = 128 and 631 against 967 us for D = 352; and the sorted row gives `tied`
    without counting the kept entries."""
    D = a.shape[-1]
    s = array_module(a).sort(a, axis=-1)                        # (..., D) ascending
    t = s[..., D - k:D - k + 1]
    return t, s[..., D - k - 1:D - k] == t


def topk_mask(x, k):
    """Boolean mask (..., D): True at the k entries of largest |x| in each row, lower index on ties."""
    xp = array_module(x)
    D = x.shape[-1]
    if k >= D:
        return xp.ones(x.shape, dtype=bool)
    if k <= 0:
        return xp.zeros(x.shape, dtype=bool)
    a = xp.abs(x)                                               # (N, D)
    t, tied = kth_largest(a, k)                                 # (N, 1), (N, 1)
    if not bool(tied.any()):
        # no row has an entry below position D - k equal to t (the usual case for
        # real-valued activations): a >= t keeps exactly k, and no tie needs breaking
        return a >= t
    gt = a > t                                                  # (N, D) surely kept
    eq = a == t                                                 # (N, D) tied with the threshold
    need = k - gt.sum(axis=-1, keepdims=True)                   # (N, 1) how many ties to keep, >= 1
    return gt | (eq & (xp.cumsum(eq, axis=-1) <= need))        # first `need` ties by index


def topk_values(x, k):
    """xs = x * topk_mask(x, k), exactly, without building the tie-broken mask: the training path.

    Why: with the straight-through estimator the backward needs no mask, and xs alone can skip
    the tie-breaking. Keeping every entry with |x| >= t (t the k-th largest |x|) keeps more
    than k only where entries tie with t. If t = 0 the extra entries are zeros and x * keep
    is still exactly xs; ReLU2's exact zeros make this the common case at the down projection,
    where the cumsum of topk_mask cost ~10% of a training step. Only rows with ties at
    t > 0 (rare for real-valued activations) go through topk_mask."""
    xp = array_module(x)
    D = x.shape[-1]
    if k >= D:
        return x
    if k <= 0:
        return xp.zeros_like(x)
    a = xp.abs(x)
    t, tied = kth_largest(a, k)                                 # (N, 1), (N, 1)
    xs = x * (a >= t)                                           # k entries kept, or more on ties
    excess = tied & (t > 0)                                     # (N, 1) rows whose ties matter
    if bool(excess.any()):
        rows = xp.nonzero(excess[..., 0])
        xs[rows] = xp.where(topk_mask(x[rows], k), x[rows], 0)      # (inf * False would be NaN)
    return xs


def topk_nonzero(x, k, block=None):
    """For one row x (D,): the ascending positions where x * topk_mask(x, k) is nonzero, i.e.
    the inputs a row-sparse product must read (decode.py). With `block`, the top k of every
    block of `block` consecutive entries instead (N:M; nm.nm_nonzero checks the sizes).

    One sort of the (D / block, block) blocks gives each block's threshold t: a block keeps
    |x| >= t, 2x faster than building the mask for a single token. Ties at t > 0 (rare for
    real activations) go through topk_mask, lower index first. Where t = 0 a block has fewer
    than k nonzeros and keeps them all (ReLU2's zeros are not read)."""
    xp = array_module(x)
    D = x.shape[0]
    block = D if block is None else block
    a = xp.abs(x)
    if k <= 0:
        return xp.zeros(0, dtype=xp.int64)
    if k >= block:
        return a.nonzero()[0]
    ab = a.reshape(D // block, block)                           # (D/block, block)
    t, tied = kth_largest(ab, k)                                # (D/block, 1) each
    # (count_nonzero: the cheapest reduction of these (D/block, 1) flags, 0.6 us against 2 for .all())
    positive = bool(xp.count_nonzero(t) == t.size)              # else some t = 0: fewer than k nonzeros
    if bool(xp.count_nonzero(tied)) and (positive or bool((tied & (t > 0)).any())):   # ties at t > 0
        mask = topk_mask(x.reshape(D // block, block), k).reshape(D)
        return (mask & (a > 0)).nonzero()[0]
    keep = ab >= t                                              # (D/block, block)
    if not positive:                                            # t = 0: only the nonzeros are read
        keep &= ab > 0
    return keep.reshape(D).nonzero()[0]


def topk_forward(x, k):
    """xs = x * TopK(|x|) with k kept per row. Returns (xs, mask); mask is what backward needs."""
    mask = topk_mask(x, k)
    return array_module(x).where(mask, x, 0), mask             # x * mask, but a dropped inf is 0, not NaN


def topk_backward(dxs, mask, ste=True):
    """Straight-through (Eq. 13) by default: dx = dxs. With ste=False the masked gradient (Eq. 12)."""
    if ste or mask is None:
        return dxs
    return dxs * mask
