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

import ctypes
import os
import sys

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


def retain_freed_memory():
    """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

    Why: a training step allocates and frees the same activations every step (about 40 MB
    at benchmarks/train_speed.py's shapes). By default glibc serves blocks over 128 KB with
    mmap or trims the heap on free, so the next step faults every page back in: about 10,000
    page faults per step, a third of the step's time on our 2-core machine (95 -> 64 ms).
    With these two settings the freed blocks are reused and the step makes no page faults.
    Blocks of 32 MB and more (mallopt's limit) are still mapped and unmapped as before.
    Only the process's speed changes, never a number it computes. Linux with glibc only;
    elsewhere (macOS, Windows, musl) this does nothing and returns False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


_blas_controller = None


def blas_threads(n):
    """A context in which BLAS runs each call with n threads (threadpoolctl), or None where
    threadpoolctl is not installed. The controller, which finds the BLAS libraries loaded in
    the process, is made once: a fresh threadpool_limits searches them again each time
    (340 us against 13 us, once per training step)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return None
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=n, user_api="blas")


set_device(os.environ.get("MINISPARSE_DEVICE", "cpu"))
