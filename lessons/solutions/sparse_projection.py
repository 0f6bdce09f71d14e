"""Lesson 03's exercise: the backward of the sparsified projection, with the straight-through estimator.

    forward:   xs = x * mask,   y = xs @ W^T          x, mask, xs: (B, T, C);  W: (O, C);  y: (B, T, O)
    backward:  dW = dout^T xs    summed over every token, all B and T      (O, C)
               dx = dout @ W     the STE (Eq. 13): dxs, at all C channels   (B, T, C)

dW takes the *sparsified* input, so a weight column learns only from the tokens that kept its
channel. dx is not multiplied by the mask: that would be the masked gradient (Eq. 12).
The package's version is minisparse/linear.py, sparse_linear_backward.
"""

import numpy as np


def projection_backward(dout, x, W, mask):
    """dout (B, T, O), x and mask (B, T, C), W (O, C)  ->  dx (B, T, C), dW (O, C)."""
    xs = np.where(mask, x, 0)                                  # x * mask (a dropped inf gives 0)
    dW = np.einsum("bto,btc->oc", dout, xs)                    # dW[o, c] = sum_{b,t} dout[b,t,o] xs[b,t,c]
    dx = np.einsum("bto,oc->btc", dout, W)                     # dxs[n, c] = sum_o dout[n, o] W[o, c]; STE: dx = dxs
    return dx, dW
