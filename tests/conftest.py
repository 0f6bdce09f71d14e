"""Shared test set-up: make the package importable from a checkout, and print at the end of the
run the worst relative error each gradient check measured (so CI logs carry the numbers)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORST = {}   # check name -> worst relative error seen


def has_gpu():
    """True where CuPy imports and sees a CUDA device (the CuPy tests skip otherwise)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def record(name, err):
    WORST[name] = max(err, WORST.get(name, 0.0))
    return err


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("worst relative error per gradient check")
        for name in sorted(WORST):
            terminalreporter.write_line(f"{name:45s} {WORST[name]:.2e}")
