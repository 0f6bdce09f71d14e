"""Block Q-Sparse: N:M structured activation sparsity (Q-Sparse, Sec. 2.4).

The channel axis is cut into blocks of `block` consecutive channels and top-K is taken
inside every block, keeping exactly `keep` of each:

    x: (N, D)  ->  (N, D / block, block)  ->  TopK(|.|, keep) per block  ->  (N, D)

so every token and every block keeps the same count, the pattern batch kernels need.
The paper writes N:M with N the *zeros* ("16:32" = 16 zeroed of 32); this code names
the kept count instead: keep=16, block=32 is 50% sparsity. Ties are broken as in
topk.py (lower index first). The backward is the same straight-through estimator.
"""

from .backend import array_module
from .errors import UsageError
from .topk import kth_largest, topk_mask


def check_nm(keep, block, D=None):
    """Raise UsageError unless 0 <= keep <= block, block >= 1, and block divides D."""
    if not (isinstance(keep, int) and isinstance(block, int) and block >= 1 and 0 <= keep <= block):
        raise UsageError(f"N:M sparsity keep={keep!r}, block={block!r} is not allowed: "
                         "it needs whole numbers with 0 <= keep <= block and block >= 1.")
    if D is not None and D % block != 0:
        raise UsageError(f"N:M block {block} does not divide the {D} channels of a projection input: "
                         f"choose a block that divides {D}.")


def nm_mask(x, keep, block):
    """Boolean mask (..., D) keeping the `keep` largest |x| of every `block` consecutive channels."""
    D = x.shape[-1]
    check_nm(keep, block, D)
    xb = x.reshape(x.shape[:-1] + (D // block, block))         # (N, D/block, block)
    return topk_mask(xb, keep).reshape(x.shape)                 # (N, D)


def nm_forward(x, keep, block):
    """xs = x * mask with the N:M mask. Returns (xs, mask); backward is topk.topk_backward."""
    mask = nm_mask(x, keep, block)
    return x * mask, mask


def nm_nonzero(x, keep, block):
    """For one row x (D,): the ascending positions where x * nm_mask(x, keep, block) is nonzero, i.e.
    the inputs a row-sparse product must read (decode.py), as topk.topk_nonzero is for top-K.

    One sort of the (D / block, block) blocks gives each block's threshold t, the keep-th largest
    |x|: a block keeps |x| >= t. Where a block's t ties with the next smaller entry and t > 0
    (rare for real activations), the tie is broken by index through nm_mask. Where t = 0 the block
    has fewer than `keep` nonzeros, and keeps them all (ReLU2's zeros: not read)."""
    xp = array_module(x)
    D = x.shape[0]
    check_nm(keep, block, D)
    if keep <= 0:
        return xp.zeros(0, dtype=xp.int64)
    a = xp.abs(x)
    if keep >= block:
        return a.nonzero()[0]
    ab = a.reshape(D // block, block)                           # (D/block, block)
    t, tied = kth_largest(ab, keep)                             # (D/block, 1) each
    if bool((tied & (t > 0)).any()):
        return (nm_mask(x, keep, block) & (a > 0)).nonzero()[0]
    return ((ab >= t) & (ab > 0)).reshape(D).nonzero()[0]
