"""Process settings that make the CPU paths faster; none changes a number that is computed.

    retain_freed_memory()   glibc's malloc keeps freed blocks for reuse
    blas_threads(n)         a context in which BLAS runs each call on n threads (threadpoolctl)
    blas_thread_count()     the threads BLAS runs each call on now
    short_blas_idle()       whether OpenBLAS's idle threads go to sleep at once (OPENBLAS_THREAD_TIMEOUT)

The programs call these (train.py with its fast ops, generate.py while the numba kernel decodes);
the reference path runs without them.
"""

import ctypes
import os
import sys


def retain_freed_memory():
    """Ask glibc's malloc to keep freed blocks for reuse instead of returning them to the OS.

    Why: a training step allocates and frees the same activations every step. By default glibc
    serves blocks over 128 KB with mmap or trims the heap on free, so the next step faults every
    page back in (benchmarks/RESULTS.md counts them). With these two settings the freed blocks are
    reused and the step makes no page faults.
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


def _controller():
    """threadpoolctl's ThreadpoolController, made once (it searches the loaded BLAS libraries, which a
    fresh threadpool_limits would do again at every training step), or None without threadpoolctl."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return None
        _blas_controller = ThreadpoolController()
    return _blas_controller


def blas_threads(n):
    """A context in which BLAS runs each call with n threads (threadpoolctl), or None where
    threadpoolctl is not installed. The limit applies from this call on, so call it in a with."""
    ctl = _controller()
    return None if ctl is None else ctl.limit(limits=n, user_api="blas")


def blas_thread_count():
    """The most threads any loaded BLAS library runs a call on now (its default, the user's
    OPENBLAS_NUM_THREADS, or a limit in force), or None where threadpoolctl is not installed."""
    ctl = _controller()
    counts = [] if ctl is None else [i["num_threads"] for i in ctl.info() if i["user_api"] == "blas"]
    return max(counts) if counts else None


def short_blas_idle():
    """Whether OpenBLAS's idle threads go to sleep at once: OPENBLAS_THREAD_TIMEOUT is set, to at
    most 10 (2^10 cycles, under a microsecond). OpenBLAS reads it when it loads, so a program sets
    it before importing NumPy (generate.py does); by default they spin for about 2^28 cycles
    (tenths of a second), sharing the cores with whatever runs next."""
    try:
        return int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")) <= 10
    except ValueError:
        return False
