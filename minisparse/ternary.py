"""Ternary weights packed 2 bits each, input-major, and the row-sparse product that reads them:
the decode of a 1.58-bit Q-Sparse model (docs/qsparse.md, Sec. 5 and 10).

A 1.58-bit projection multiplies INT8 input codes q by ternary weight codes c (quant.py):

    xq = q / s_x,   Wq_i = c_i * (alpha_i + eps)        q: (D,) in [-127, 127],  c_i: (O_i, D) in {-1, 0, 1}

so, with C = [c_1^T ... c_n^T] input-major (D, O) and a scale per output column,
col_scale[o] = alpha_i + eps for the columns of weight i,

    y[o] = (sum_{d in idx} q[d] * C[d, o]) * col_scale[o] / s_x           idx: the nonzero q (top-K's)

The sum is of integers, exact in int32; only the last line rounds. Packing: u = c + 1 in {0, 1, 2}
takes 2 bits, and each byte holds four of a row's columns, one from each quarter of the row
(the layout a vectorized kernel reads best: quarter i of the row comes from bits 2i..2i+1):

    P[d, j] = sum_{i < 4} u[d, i * Q + j] << 2i          P: (D, Q) uint8,  Q = O_pad / 4

O is padded with zero codes to a multiple of 4. A token reads D * O / 4 bytes dense, a quarter
of a byte a weight, and only len(idx) * O / 4 when sparse: 16x fewer bytes than float32 before
any sparsity. With u in place of c the sum gains sum_{d in idx} q[d] per column, which is
subtracted once at the end:

    sum_d q[d] C[d, o] = sum_d q[d] u[d, o] - sum_d q[d]

This file is the readable reference; fast/ternary.py has the compiled kernel, equal to it exactly.
"""

from dataclasses import dataclass

import numpy as np

from .linear import sparsify
from .quant import quantize_activations, quantize_weights

SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)       # bits of quarter i: 2i .. 2i + 1


@dataclass
class TernaryWeights:
    """Several weights sharing one input, ternarized and packed input-major."""
    packed: np.ndarray          # (D, Q) uint8, Q = O_pad / 4
    col_scale: np.ndarray       # (O,): alpha_i + eps for each output column, in the weights' dtype
    sizes: list                 # [O_i], the outputs of each weight, in order

    @property
    def O(self):
        return int(self.col_scale.shape[0])


def pack_codes(C):
    """Ternary codes C (D, O) in {-1, 0, 1} -> P (D, Q) uint8, O padded to 4 Q with zero codes."""
    D, O = C.shape
    Q = -(-O // 4)
    u = np.ones((D, 4 * Q), dtype=np.uint8)                        # code 0 is stored as u = 1
    u[:, :O] = (C + 1).astype(np.uint8)
    quarters = u.reshape(D, 4, Q)                                  # quarter i: columns i Q .. i Q + Q - 1
    return (quarters << SHIFTS[None, :, None]).sum(axis=1, dtype=np.uint8)   # disjoint bits: sum = or


def unpack_codes(P, O):
    """P (..., Q) uint8 -> codes (..., O) int8 in {-1, 0, 1}: pack_codes' inverse."""
    u = (P[..., None, :] >> SHIFTS[:, None]) & 3                  # (..., 4, Q)
    return (u.reshape(P.shape[:-1] + (4 * P.shape[-1],))[..., :O]).astype(np.int8) - 1


def pack_weights(weights):
    """[W_i (O_i, D)] latent weights -> TernaryWeights: each ternarized with its own alpha (quant.py)."""
    codes, col_scale = [], []
    for W in weights:
        W = np.asarray(W)
        w, scale = quantize_weights(W)                             # w: (O_i, D) codes, scale 1 / (alpha + eps)
        codes.append(w.T)
        col_scale.append(np.full(W.shape[0], 1.0 / scale, dtype=W.dtype))
    return TernaryWeights(pack_codes(np.concatenate(codes, axis=1)), np.concatenate(col_scale),
                          [W.shape[0] for W in weights])


def ternary_rows_matvec(qv, idx, packed, O):
    """The integer sums: acc[o] = sum_k qv[k] * C[idx[k], o], int32 (O,). qv: (K,) integer codes."""
    C = unpack_codes(packed[idx], O).astype(np.int32)              # (K, O): the only rows read
    return qv.astype(np.int32) @ C


def ternary_sparse_matvec(x, spec, tw, rows_matvec=ternary_rows_matvec):
    """One token x (D,) of a 1.58-bit model: y (O,) = Q(sparsify(x)) @ Q_w(W)^T from the packed
    weights, and the rows read. rows_matvec: this file's, or fast.ternary's (equal exactly)."""
    xs, _ = sparsify(x[None], spec)                                # (1, D) top-K or N:M
    q, s_x = quantize_activations(xs)                              # (1, D) codes, (1, 1) scale
    idx = np.flatnonzero(q[0])                                     # rows with a nonzero code
    acc = rows_matvec(q[0, idx].astype(np.int32), idx, tw.packed, tw.O)
    return acc.astype(tw.col_scale.dtype) * (tw.col_scale / s_x[0, 0]), int(idx.shape[0])

