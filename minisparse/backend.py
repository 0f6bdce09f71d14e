"""The array backend: the one place that chooses NumPy (CPU) or CuPy (GPU).

    MINISPARSE_DEVICE=cpu   (default)  ->  xp is numpy
    MINISPARSE_DEVICE=gpu              ->  xp is cupy

or, from Python, `set_device("gpu")` before any array is made.

Every other file writes `xp = array_module(x)` inside a function: the module that owns
the array `x` (numpy or cupy) does the work, so the same lines run on both devices.
Arrays are *created* on the chosen device by `asarray` (parameters are initialised in
NumPy with a seeded generator and then moved, so the CPU and GPU start from the same
numbers). CuPy is imported only when the GPU is asked for.
"""

import os

import numpy as np

from .errors import UsageError

xp = np        # the chosen array module; replaced by cupy in set_device("gpu")
_device = "cpu"


def set_device(name):
    """Choose 'cpu' (NumPy) or 'gpu' (CuPy). Fails with one sentence if the GPU is not usable."""
    global xp, _device
    if name == "cpu":
        xp, _device = np, "cpu"
        return
    if name != "gpu":
        raise UsageError(f"device {name!r} is not known: use 'cpu' (NumPy) or 'gpu' (CuPy).")
    try:
        import cupy
    except ImportError:
        raise UsageError("device 'gpu' needs CuPy, which is not installed: "
                         "pip install cupy-cuda12x (or the build for your CUDA), or use --device cpu.") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CUDA driver missing or broken: cupy raises its own error types
        n = 0
    if n == 0:
        raise UsageError("device 'gpu' was asked for, but CuPy finds no CUDA device: use --device cpu.")
    xp, _device = cupy, "gpu"


def get_device():
    """'cpu' or 'gpu': the device new arrays are made on."""
    return _device


def array_module(x):
    """numpy or cupy: the module that owns array x (cupy only if it is already imported)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def asarray(a, dtype=None):
    """Put a (NumPy) array on the chosen device."""
    return xp.asarray(a, dtype=dtype)


def to_numpy(a):
    """Bring an array back to the host as a NumPy array (a no-op on the CPU)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


set_device(os.environ.get("MINISPARSE_DEVICE", "cpu"))
