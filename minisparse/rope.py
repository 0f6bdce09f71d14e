"""Rotary position embeddings, RoPE (Su et al. 2021), as in LLaMA.

Each head vector of size hs is cut into two halves (x1, x2), and pair i = (x1_i, x2_i)
is rotated by the angle p * theta_i at position p:

    theta_i = base^(-2i / hs),   i = 0 .. hs/2 - 1                      cos, sin: (T, hs/2)
    y1 = x1 * cos - x2 * sin                                            x, y: (B, H, T, hs)
    y2 = x1 * sin + x2 * cos

This is the "rotate half" layout of the Hugging Face LLaMA code (layout="half"). GGUF files
store q and k reordered for llama.cpp's layout, which pairs *adjacent* channels instead:
x1 = x[..., 0::2], x2 = x[..., 1::2] (layout="pairs"; docs/qsparse.md, Sec. 9). The same weights
with the wrong layout still run, but predict badly. A rotation's inverse is its transpose,
so the backward rotates by the opposite angle:

    dx1 =  dy1 * cos + dy2 * sin
    dx2 = -dy1 * sin + dy2 * cos

`offset` shifts the positions, for decoding one new token after `offset` cached ones.
"""

import functools

from .backend import array_module


@functools.lru_cache(maxsize=16)
def rope_tables(xp, T, hs, base=10000.0, offset=0, dtype=None):
    """cos, sin: (T, hs/2) for positions offset .. offset + T - 1. Computed once per set of
    arguments (every layer's q and k reuse them); the cached arrays are only ever read."""
    inv_freq = base ** (-xp.arange(0, hs // 2, dtype=xp.float64) * 2.0 / hs)   # (hs/2,)
    angles = xp.arange(offset, offset + T, dtype=xp.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def _split(x, layout):
    hs = x.shape[-1]
    if layout == "pairs":
        return x[..., 0::2], x[..., 1::2]
    return x[..., :hs // 2], x[..., hs // 2:]


def _join(xp, y1, y2, layout):
    if layout == "pairs":
        return xp.stack([y1, y2], axis=-1).reshape(y1.shape[:-1] + (2 * y1.shape[-1],))   # interleave
    return xp.concatenate([y1, y2], axis=-1)


def rotate(x, cos, sin, layout="half"):
    """y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos: each pair (x1_i, x2_i) turned by its angle."""
    x1, x2 = _split(x, layout)                                 # (..., hs/2) each
    return _join(array_module(x), x1 * cos - x2 * sin, x1 * sin + x2 * cos, layout)


def rope_forward(x, base=10000.0, offset=0, layout="half", rotate=rotate):
    """x (B, H, T, hs) -> rotated y (B, H, T, hs), cache (cos, sin, layout, rotate).
    rotate: this module's `rotate`, or a faster function equal to it (model.Ops)."""
    xp = array_module(x)
    T, hs = x.shape[-2], x.shape[-1]
    cos, sin = rope_tables(xp, T, hs, base, offset, x.dtype)   # (T, hs/2)
    return rotate(x, cos, sin, layout), (cos, sin, layout, rotate)


def rope_backward(dy, cache):
    cos, sin, layout, rotate = cache
    return rotate(dy, cos, -sin, layout)                       # the opposite angle
