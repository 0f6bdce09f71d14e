"""Gradient checking: centred finite differences in float64, used by tests/ and the lessons.

    df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / (2 h),   h = 1e-6, error O(h^2)

plus rounding, about eps * |f| / h: on the tests' shapes relative errors of 2e-11 to 3.4e-9 per
layer and up to 1.0e-7 for the whole model, from which tests/test_grad.py sets its tolerances.

rel_error(a, b) = max|a - b| / max(max|a|, max|b|): one number per tensor, so a tiny
entry next to large ones does not dominate, and a wrong sign or factor anywhere shows.
"""

import numpy as np


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def numerical_grad(f, x, h=1e-6):
    """d f / d x for a scalar function f() of the array x (changed in place and restored)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad
