"""Fast embedding backward: embedding.embedding_backward's scatter-add by sorting instead of add.at.

    fast.embedding.embedding_backward(dx, cache)  equals  embedding.embedding_backward(dx, cache)
    up to float rounding (the sums are made in another order; tests/test_fast.py)

Why faster on the CPU: NumPy's add.at handles one element at a time. Sorted by token, the rows
of each token are adjacent, and one reduceat call sums every run. On the GPU, add.at is already
an atomic scatter, so CuPy arrays take the reference.
"""

import numpy as np

from ..backend import array_module
from ..embedding import embedding_backward as reference_backward


def embedding_backward(dx, cache):
    if array_module(dx) is not np:
        return reference_backward(dx, cache)
    idx, shape = cache
    ids, rows = idx.reshape(-1), dx.reshape(-1, shape[1])      # (N,), (N, C)
    dwte = np.zeros(shape, dtype=dx.dtype)                     # (V, C)
    order = np.argsort(ids, kind="stable")                     # (N,)
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])   # first row of each token
    dwte[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return dwte
