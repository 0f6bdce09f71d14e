"""Block Q-Sparse: N:M structured activation sparsity (Q-Sparse, Sec. 2.4).

The channel axis is cut into blocks of `block` consecutive channels and top-K is taken
inside every block, keeping exactly `keep` of each:

    x: (N, D)  ->  (N, D / block, block)  ->  TopK(|.|, keep) per block  ->  (N, D)

so every token and every block keeps the same count, the pattern batch kernels need.
The paper calls this N:M without settling whether N counts the kept or the zeroed entries
(its one example, 16:32 at 50%, reads the same either way; docs/qsparse.md, Sec. 4). This
code makes a choice and names the kept count: keep=16, block=32 is 50% sparsity, and
keep=8, block=32 (--nm 8:32) is 75%. Ties are broken as in topk.py (lower index first).
The backward is the same straight-through estimator.
"""

from .backend import array_module
from .errors import UsageError
from .topk import topk_mask


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
    """xs = x * mask with the N:M mask (a dropped inf gives 0, as in topk.py). Returns (xs, mask);
    backward is topk.topk_backward."""
    mask = nm_mask(x, keep, block)
    return array_module(x).where(mask, x, 0), mask             # x * mask, but a dropped inf is 0, not NaN
