"""Causal multi-head scaled dot-product attention (Vaswani et al. 2017).

    S = q @ k^T / sqrt(hs)            q: (B, H, Tq, hs), k, v: (B, H, Tk, hs), S: (B, H, Tq, Tk)
    S[i, j] = -inf where key j is in the future of query i
    P = softmax(S) over the keys      P: (B, H, Tq, Tk)
    y = P @ v                         y: (B, H, Tq, hs)

The Tq queries are the last Tq of the Tk positions (Tq = Tk in training; Tq = 1 when
decoding with a key/value cache), so query i may see keys j <= i + Tk - Tq.

Backward:
    dv = P^T @ dy
    dP = dy @ v^T
    dS = P * (dP - sum_j(dP * P))           softmax's Jacobian, row by row
    dq = dS @ k / sqrt(hs)
    dk = dS^T @ q / sqrt(hs)
"""

import math

from .backend import array_module


def attention_forward(q, k, v):
    xp = array_module(q)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(hs)
    S = (q @ k.swapaxes(-1, -2)) * scale                       # (B, H, Tq, Tk)
    if Tq > 1:
        # future keys: j > i + (Tk - Tq)
        future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        S = xp.where(future, -xp.inf, S)
    S = S - S.max(axis=-1, keepdims=True)                      # stable softmax
    P = xp.exp(S)
    P /= P.sum(axis=-1, keepdims=True)                         # (B, H, Tq, Tk)
    y = P @ v                                                  # (B, H, Tq, hs)
    return y, (q, k, v, P, scale)


def attention_backward(dy, cache):
    q, k, v, P, scale = cache
    dv = P.swapaxes(-1, -2) @ dy                               # y = P v     -> dv = P^T dy
    dP = dy @ v.swapaxes(-1, -2)                               #             -> dP = dy v^T
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))       # P = softmax(S)
    dq = (dS @ k) * scale                                      # S = q k^T s -> dq = dS k s
    dk = (dS.swapaxes(-1, -2) @ q) * scale                     #             -> dk = dS^T q s
    return dq, dk, dv
