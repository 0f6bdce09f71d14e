"""numba.njit with one rule for the on-disk cache: a compiled function that runs threads
(parallel=True), or that calls one that does, is never cached; every other one is.

Why. numba names the threaded part of a parallel=True function, its gufunc, after the address in
memory of the compiler's object for the loop (`__numba_parfor_gufunc_0x...`, from hash(parfor)).
That name is unique only inside one process at one moment. A function that calls a parallel one
carries a copy of that gufunc in its compiled code, under that name, and the cache stores the code
as it is. Cache entries written by different processes (the test suite, then generate.py on other
models, each compiling the types it needed) are later loaded into one process together, where two
different gufuncs can meet under one name, or the caller's copy can be bound to another entry's
definition: the call then jumps into code built for other arguments, and the process dies with a
segmentation fault and no message (numba issues 8578, 4807 and 10128 report the same family). An
address-named symbol never reaches the disk under this rule, so no mix of cache entries can bring
two together: the cost is that the few functions that thread are compiled again in each process.

tests/test_jit.py holds every compiled function of minisparse.fast to the rule, by reading which
compiled functions each one calls, and runs the decode in fresh processes sharing one cache in
several orders, then again from the cache.
"""

try:                                   # optional: pip install numba
    import numba
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None


def njit(*, parallel=False, calls_parallel=False, **options):
    """numba.njit(parallel=parallel, cache=...) under the rule above: calls_parallel=True for a
    function that calls a parallel one (directly or through another function of this kind)."""
    return numba.njit(parallel=parallel, cache=not (parallel or calls_parallel), **options)


def threads(dispatcher):
    """Whether a compiled function runs threads itself (parallel=True)."""
    return bool(dispatcher.targetoptions.get("parallel"))


def cached(dispatcher):
    """Whether a compiled function writes and reads numba's on-disk cache."""
    return type(dispatcher._cache).__name__ != "NullCache"
