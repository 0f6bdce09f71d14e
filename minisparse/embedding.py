"""Token embedding: a table lookup, dense (Q-Sparse leaves embeddings unsparsified).

    x[b, t] = wte[idx[b, t]]          idx: (B, T) ints, wte: (V, C), x: (B, T, C)

Backward scatters the gradient back to the rows that were read; a token that appears
several times collects the sum:

    dwte[v] = sum over (b, t) with idx[b, t] = v of dx[b, t]

minisparse/fast/embedding.py makes the same sums faster on the CPU.
"""

from .backend import array_module


def embedding_forward(idx, wte):
    return wte[idx], (idx, wte.shape)


def embedding_backward(dx, cache):
    idx, shape = cache
    xp = array_module(dx)
    dwte = xp.zeros(shape, dtype=dx.dtype)                     # (V, C)
    xp.add.at(dwte, idx.reshape(-1), dx.reshape(-1, shape[1]))  # += for every repeat of a token
    return dwte
