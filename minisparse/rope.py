"""Rotary position embeddings, RoPE (Su et al. 2021), as in LLaMA.

Each head vector of size hs is cut into two halves (x1, x2), and pair i = (x1_i, x2_i)
is rotated by the angle p * theta_i at position p:

    theta_i = base^(-2i / hs),   i = 0 .. hs/2 - 1                      cos, sin: (T, hs/2)
    y1 = x1 * cos - x2 * sin                                            x, y: (B, H, T, hs)
    y2 = x1 * sin + x2 * cos

This is the "rotate half" layout of the Hugging Face LLaMA code. A rotation's inverse is
its transpose, so the backward rotates by the opposite angle:

    dx1 =  dy1 * cos + dy2 * sin
    dx2 = -dy1 * sin + dy2 * cos

`offset` shifts the positions, for decoding one new token after `offset` cached ones.
"""

from .backend import array_module


def rope_tables(xp, T, hs, base=10000.0, offset=0, dtype=None):
    """cos, sin: (T, hs/2) for positions offset .. offset + T - 1."""
    inv_freq = base ** (-xp.arange(0, hs // 2, dtype=xp.float64) * 2.0 / hs)   # (hs/2,)
    angles = xp.arange(offset, offset + T, dtype=xp.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rope_forward(x, base=10000.0, offset=0):
    """x (B, H, T, hs) -> rotated y (B, H, T, hs), cache (cos, sin)."""
    xp = array_module(x)
    T, hs = x.shape[-2], x.shape[-1]
    cos, sin = rope_tables(xp, T, hs, base, offset, x.dtype)   # (T, hs/2)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    y = xp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return y, (cos, sin)


def rope_backward(dy, cache):
    xp = array_module(dy)
    cos, sin = cache
    hs = dy.shape[-1]
    dy1, dy2 = dy[..., :hs // 2], dy[..., hs // 2:]
    return xp.concatenate([dy1 * cos + dy2 * sin, -dy1 * sin + dy2 * cos], axis=-1)
