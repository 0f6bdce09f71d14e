"""RMSNorm (Zhang and Sennrich 2019), the LLaMA norm used before attention and FFN.

    r = 1 / sqrt(mean_c(x^2) + eps)         x: (B, T, C),  r: (B, T, 1)
    y = x * r * g                           g: (C,),       y: (B, T, C)

Backward, with xhat = x * r:
    dg = sum_{B,T} dy * xhat
    dx = r * (dxhat - xhat * mean_c(dxhat * xhat)),   dxhat = dy * g

minisparse/fast/norm.py computes the same with fused reductions.
"""

from .backend import array_module


def rmsnorm_forward(x, g, eps=1e-5):
    xp = array_module(x)
    r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)   # (B, T, 1)
    xhat = x * r                                                    # (B, T, C)
    y = xhat * g                                                    # (B, T, C)
    return y, (xhat, r, g)


def rmsnorm_backward(dy, cache):
    xhat, r, g = cache
    C = xhat.shape[-1]
    dg = (dy * xhat).reshape(-1, C).sum(axis=0)                     # (C,)   y = xhat * g
    dxhat = dy * g                                                  # (B, T, C)
    # xhat = x * r(x): the direct path, plus the path through r
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg
