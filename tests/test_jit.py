"""The compiled kernels' on-disk cache (minisparse/fast/jit.py): no function that runs threads, nor
one that calls such a function, is cached, so no cache left by any history of use can bind one
process's threaded code under another's name (the segmentation faults of numba issues 8578 and
10128). Checked two ways: by reading which compiled functions each one calls, and by running the
decode in fresh processes that share one new cache, in several orders, then again from the cache.
Needs numba (the CI's numba phase runs this file)."""

import os
import subprocess
import sys

import pytest

numba = pytest.importorskip("numba")

from minisparse.fast import jit, rowsparse, step, ternary  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cache_worker.py")


def dispatchers(module):
    return {name: f for name, f in vars(module).items() if isinstance(f, numba.core.dispatcher.Dispatcher)}


def callees(f):
    """The compiled functions f's Python source names: its globals and its closure's."""
    py = f.py_func
    found = [py.__globals__.get(n) for n in py.__code__.co_names]
    found += [cell.cell_contents for cell in py.__closure__ or ()]
    return [c for c in found if isinstance(c, numba.core.dispatcher.Dispatcher)]


def rule_broken(functions):
    """The functions whose caching breaks the rule: cached, yet they run threads or call, directly
    or through others, a function that does."""
    memo = {}

    def reaches_threads(f, seen=()):
        if f not in memo:
            memo[f] = jit.threads(f) or any(reaches_threads(c, seen + (f,)) for c in callees(f) if c not in seen)
        return memo[f]

    return sorted(name for name, f in functions.items() if jit.cached(f) and reaches_threads(f))


def test_no_cached_function_runs_or_calls_threads():
    functions = {}
    for module in (step, rowsparse, ternary):
        functions.update({f"{module.__name__}.{n}": f for n, f in dispatchers(module).items()})
    assert len(functions) >= 15                                  # the kernels were found
    assert rule_broken(functions) == []
    threaded = {n for n, f in functions.items() if jit.threads(f)}
    assert {"minisparse.fast.step._rows_matvec_split", "minisparse.fast.rowsparse._numba_rows_matvec",
            "minisparse.fast.ternary._ternary_rows"} <= threaded
    # the leaves stay cached, so a process compiles only the threaded functions and their callers
    assert jit.cached(step._select) and jit.cached(step._rows_into) and jit.cached(step._attend)


def test_the_check_finds_a_cached_caller_of_a_threaded_function():
    """The pattern of the crashes: a cached plain function calling a parallel one."""
    @numba.njit(parallel=True)
    def inner(a):
        for i in numba.prange(a.shape[0]):
            a[i] += 1

    def outer(a):
        inner(a)

    assert rule_broken({"outer": numba.njit(cache=True)(outer), "inner": inner}) == ["outer"]
    assert rule_broken({"outer": jit.njit(calls_parallel=True)(outer), "inner": inner}) == []
    assert rule_broken({"outer": numba.njit(cache=True)(lambda a: a + 1), "inner": inner}) == []


ORDERS = [
    ["tiny-f32", "tiny-f64", "kernels"],
    ["kernels", "batch", "tiny-f64", "ternary"],
    ["smollm2-f64", "tiny-f32"],
    ["dense-f64", "wide-f32", "tiny-f64", "batch", "smollm2-f64"],
]


def run_worker(uses, cache):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-X", "faulthandler", WORKER, *uses], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{uses} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


def test_processes_sharing_one_cache_in_any_order_then_from_it(tmp_path):
    """Fresh processes fill one new cache in several orders (tiny and SmolLM2-135M models, float32
    and float64, dense, sparse, a batch, 1.58 bits, the kernels called directly), then each history
    runs again from the filled cache: no crash, and the same tokens."""
    cache = tmp_path / "numba-cache"
    first = [run_worker(uses, cache) for uses in ORDERS]
    assert any(p.suffix == ".nbi" for p in cache.rglob("*"))       # the leaves were cached
    again = [run_worker(uses, cache) for uses in ORDERS]
    assert again == first
    seen = {}
    for out in first + again:                                       # a use gives one answer in every order
        for use, tokens in out.items():
            assert seen.setdefault(use, tokens) == tokens, use
