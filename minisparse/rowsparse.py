"""The row-sparse product: a projection that reads only the weight rows its input selected.

This is where Q-Sparse's saving is real (docs/qsparse.md, Sec. 10). For one token, top-K keeps
K of the D inputs, so xs is nonzero only at the positions idx. With the weight stored
input-major, Wt = W^T: (D, O), the product needs only those K rows of Wt:

    y = xs @ Wt = sum_{k < K}  xs[idx[k]] * Wt[idx[k], :]            xs: (D,), idx: (K,), y: (O,)

It reads K*O of the D*O weights and does K*O of the multiply-adds: the ideal speedup over the
dense product is D / K = 1 / (1 - S). Decoding one token is limited by reading the weights from
memory, so the bytes read are what count. Entries that are already zero (ReLU2's) are not read
either: idx holds the nonzeros of xs, at most K.

Several weights sharing one input (q, k, v) are concatenated input-major, Wt = [W_1^T ... W_n^T],
so one selection serves them all.

A batch of B tokens (batched decoding: one token of each of B sequences) reads each row once
for all the tokens that use it: the rows needed are the union of the tokens' selections,

    u = {d : xs[b, d] != 0 for some b}          y = xs[:, u] @ Wt[u]         xs: (B, D), y: (B, O)

|u| grows with B towards D (benchmarks/batch_union.py measures it), so the saving shrinks as the
batch grows; tokens that did not select a row of u multiply it by their zero.

This file is the readable reference: `Wt[idx]` copies the K
rows before the product. minisparse/fast/rowsparse.py has the kernels that read each row once
(numba on the CPU, CUDA on the GPU), tested equal to these functions.
"""

from .backend import array_module
from .linear import quantized_input


def input_major(weights):
    """[W_i (O_i, D)] -> Wt (D, sum O_i), C-contiguous: row d holds every output's weight for input d."""
    xp = array_module(weights[0])
    return xp.ascontiguousarray(xp.concatenate([W.T for W in weights], axis=1))


def rows_matvec(vals, idx, Wt):
    """y = vals @ Wt[idx].  vals, idx: (K,); Wt: (D, O) -> y: (O,)."""
    return vals @ Wt[idx]


def sparse_rows_matvec(x, spec, Wt):
    """One token x (D,): y = xs @ Wt with xs = linear.quantized_input(x, spec), its top-K or N:M
    (INT8 too where spec.a_bits = 8), reading only the rows where xs != 0.
    Returns y (O,) and how many rows were read."""
    xs = quantized_input(x[None], spec)[0][0]                    # (D,)
    idx = array_module(x).flatnonzero(xs)                        # (<= K,) ascending
    return rows_matvec(xs[idx], idx, Wt), int(idx.shape[0])


def union_rows_matmul(xs, Wt):
    """Several tokens' sparsified inputs xs (B, D): y = xs @ Wt reading only the union of their
    nonzero rows, each once. Returns y (B, O) and the rows read, |u|."""
    xp = array_module(xs)
    u = xp.flatnonzero((xs != 0).any(axis=0))                  # (|u|,) ascending
    return xs[:, u] @ Wt[u], int(u.shape[0])


def sparse_rows_matmul(x, spec, Wt):
    """Several tokens x (B, D): each row sparsified (and quantized) by spec as in sparse_rows_matvec,
    then union_rows_matmul. Returns y (B, O) and the rows read."""
    xs = quantized_input(x, spec)[0]                             # (B, D)
    return union_rows_matmul(xs, Wt)
