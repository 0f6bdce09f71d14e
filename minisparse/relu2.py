"""Squared ReLU and the ReLU2-GLU feed-forward activation (Q-Sparse, Eq. 11).

    ReLU2(z) = max(z, 0)^2
    h = up * ReLU2(gate)          up = x W_up^T, gate = x W_gate^T;  up, gate, h: (B, T, Hd)

Every negative gate gives an exact zero in h, the input of the down projection: these
are the "natural" zeros that top-K then adds to. Backward, with r = max(gate, 0):

    dup   = dh * r^2
    dgate = dh * up * 2 r         (d/dz max(z,0)^2 = 2 max(z,0), continuous at 0)
"""

from .backend import array_module


def relu2glu_forward(up, gate):
    xp = array_module(up)
    r = xp.maximum(gate, 0)                                    # (B, T, Hd)
    h = up * (r * r)                                           # (B, T, Hd)
    return h, (up, r)


def relu2glu_backward(dh, cache):
    up, r = cache
    dup = dh * (r * r)
    dgate = dh * up * (2 * r)
    return dup, dgate
