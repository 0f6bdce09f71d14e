"""Shared test set-up: make the package importable from a checkout, and print at the end of the
run the worst relative error each gradient check measured (so CI logs carry the numbers)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORST = {}   # check name -> worst relative error seen


def has_gpu():
    """True where CuPy imports and sees a CUDA device (the CuPy tests skip otherwise)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def row_kinds(rng, N=12, D=24):
    """(kind, rows (N, D)) that stress a top-K: rows that differ; rows of heavy ties; ReLU2 outputs
    with many exact zeros; all zeros; identical rows; rows of one value each (every entry ties)."""
    yield "distinct", rng.standard_normal((N, D))
    yield "ties", rng.integers(-2, 3, size=(N, D)).astype(np.float64)
    g = rng.standard_normal((N, D))
    yield "relu2_zeros", rng.standard_normal((N, D)) * np.maximum(g, 0) ** 2
    yield "all_zero", np.zeros((N, D))
    row = rng.standard_normal(D)
    yield "identical", np.tile(row, (N, 1))
    yield "constant", np.repeat(rng.standard_normal((N, 1)), D, axis=1)


def record(name, err):
    WORST[name] = max(err, WORST.get(name, 0.0))
    return err


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("worst relative error per gradient check")
        for name in sorted(WORST):
            terminalreporter.write_line(f"{name:45s} {WORST[name]:.2e}")
