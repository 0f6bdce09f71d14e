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

import functools
import math

from .backend import array_module


@functools.lru_cache(maxsize=8)
def causal_bias(xp, Tq, Tk, dtype):
    """(Tq, Tk): 0 where query i may see key j (j <= i + Tk - Tq), -inf for future keys.
    Added to S, it is exactly the masking S[i, j] = -inf (x + 0 = x). Made once per shape:
    the cached array is only ever read."""
    return xp.triu(xp.full((Tq, Tk), -xp.inf, dtype=dtype), k=Tk - Tq + 1)


def attention_forward(q, k, v):
    xp = array_module(q)
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(hs)
    # The (B, H, Tq, Tk) arrays are the largest of the step: each line below updates S in
    # place rather than making a new array, which saves the allocation and a pass over memory.
    S = q @ k.swapaxes(-1, -2)                                 # (B, H, Tq, Tk)
    S *= scale
    if Tq > 1:
        S += causal_bias(xp, Tq, Tk, S.dtype)                  # future keys -> -inf
    S -= S.max(axis=-1, keepdims=True)                         # stable softmax
    P = xp.exp(S, out=S)
    P /= P.sum(axis=-1, keepdims=True)                         # (B, H, Tq, Tk)
    y = P @ v                                                  # (B, H, Tq, hs)
    return y, (q, k, v, P, scale)


def attention_backward(dy, cache):
    q, k, v, P, scale = cache
    dv = P.swapaxes(-1, -2) @ dy                               # y = P v     -> dv = P^T dy
    dS = dy @ v.swapaxes(-1, -2)                               #             -> dP = dy v^T
    dS -= (dS * P).sum(axis=-1, keepdims=True)                 # P = softmax(S): dS = P * (dP - sum(dP * P))
    dS *= P                                                    #   (built in place in dP's array)
    dS *= scale
    dq = dS @ k                                                # S = q k^T s -> dq = dS k s
    dk = dS.swapaxes(-1, -2) @ q                               #             -> dk = dS^T q s
    return dq, dk, dv
