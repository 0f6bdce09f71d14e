"""Top-K sparsification with the straight-through estimator (Q-Sparse, Sec. 2.1-2.2).

Forward (Eq. 2-3), per token, along the channel axis:

    xs = x * mask,     mask = TopK(|x|)          x, mask, xs: (N, D)  (any leading dims)

`mask` is 1 at exactly K entries of each row, those of largest |x|, and 0 elsewhere.
Ties are broken by position: among entries with equal |x| the lower channel index is
kept, so a row never keeps more than K (a `>=` threshold would; docs/qsparse.md, Sec. 8).

Sparsity S is the fraction of each row that is zeroed:

    K = D - floor(S * D + 1/2)        (S = 0 keeps all D; S = 0.5 with D = 128 keeps 64)

A dropped entry is 0 even where x is infinite (x * mask would give inf * 0 = NaN).
minisparse/fast/topk.py computes the same xs faster.

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


def topk_mask(x, k):
    """Boolean mask (..., D): True at the k entries of largest |x| in each row, lower index on ties."""
    xp = array_module(x)
    D = x.shape[-1]
    if k >= D:
        return xp.ones(x.shape, dtype=bool)
    if k <= 0:
        return xp.zeros(x.shape, dtype=bool)
    a = xp.abs(x)                                               # (N, D)
    t = xp.sort(a, axis=-1)[..., D - k:D - k + 1]               # (N, 1) the k-th largest |x|
    gt = a > t                                                  # (N, D) surely kept
    eq = a == t                                                 # (N, D) tied with the threshold
    need = k - gt.sum(axis=-1, keepdims=True)                   # (N, 1) how many ties to keep, >= 1
    return gt | (eq & (xp.cumsum(eq, axis=-1) <= need))        # the first `need` ties by index


def topk_forward(x, k):
    """xs = x * TopK(|x|) with k kept per row. Returns (xs, mask); mask is what backward needs."""
    mask = topk_mask(x, k)
    return array_module(x).where(mask, x, 0), mask             # x * mask, but a dropped inf is 0, not NaN


def topk_backward(dxs, mask, ste=True):
    """Straight-through (Eq. 13) by default: dx = dxs. With ste=False the masked gradient (Eq. 12)."""
    if ste or mask is None:
        return dxs
    return dxs * mask
