"""The compiled kernels' on-disk cache (minisparse/fast/jit.py): no function that runs threads, nor
one that calls such a function by name, is cached, so no cache left by any history of use can bind
one process's threaded code under another's name (the segmentation faults of numba issues 8578 and
10128); the big functions that run threaded ones through jit.call are cached, and a new process
loads them instead of compiling them. Checked by reading which compiled functions each one calls,
by reading the cache's files for a gufunc's name, and by running the decode in fresh processes
that share one new cache, in several orders, then again from the cache.
Needs numba (the CI's numba phase runs this file)."""

import json
import os
import subprocess
import sys

import numpy as np
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
    # every other one is cached, the layer and the head included: they run the threaded functions
    # through jit.call, so a process compiles only the threaded functions it uses
    assert {n for n, f in functions.items() if not jit.cached(f)} == threaded
    assert jit.cached(step._layer) and jit.cached(step._head) and jit.cached(ternary._token)


def test_a_cached_function_runs_a_threaded_kernel_passed_in():
    """jit.call runs the kernel; the caller holds no gufunc and breaks no rule; a kernel compiled for
    other argument types (or none) raises instead of running."""
    @numba.njit(parallel=True)
    def inner(a, n):
        for i in numba.prange(a.shape[0]):
            a[i] += n

    def outer(k, a):
        jit.call(k, a[1:], 2)

    run = numba.njit(outer)                     # not cached here, so that its code can be read
    a = np.zeros(5)
    run(jit.kernel(inner, numba.typeof(a), numba.types.int64), a)
    assert a.tolist() == [0, 2, 2, 2, 2]
    assert "parfor_gufunc" not in run.inspect_llvm(run.signatures[0])
    assert rule_broken({"outer": numba.njit(cache=True)(outer), "inner": inner}) == []
    for wrong in (jit.kernel(inner, numba.typeof(a), numba.types.float64), jit.NO_KERNEL):
        with pytest.raises(TypeError, match="other argument types"):
            run(wrong, a)


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


def run_worker(uses, cache):
    """The worker's lines {use: answer}, and its cache report (cache_worker.cache_report)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-X", "faulthandler", WORKER, *uses], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{uses} exited {r.returncode}:\n{r.stderr[-3000:]}"
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    return out, json.loads(out.pop("cache"))


def gufunc_files(cache):
    """The cache's files that hold a gufunc's address-made name: none, under the rule."""
    return sorted(p.name for p in cache.rglob("*.nbc") if b"parfor_gufunc" in p.read_bytes())


def test_reading_the_cache_finds_a_cached_caller_of_a_threaded_function(tmp_path):
    cache = tmp_path / "numba-cache"
    run_worker(["planted"], cache)
    assert any("_planted_caller" in name for name in gufunc_files(cache))


def test_a_new_process_loads_the_step_from_the_cache(tmp_path):
    """The second of two processes on one new cache compiles none of the cached functions, loads
    the layer, the head and the 1.58-bit token from the cache, and compiles no threaded function
    for a tiny model (all its products run on one thread)."""
    cache = tmp_path / "numba-cache"
    first, report = run_worker(["tiny-f32", "ternary"], cache)
    assert {"step._layer", "step._head", "ternary._token"} <= set(report["misses"])
    again, report = run_worker(["tiny-f32", "ternary"], cache)
    assert again == first
    assert report["misses"] == {}
    assert {"step._layer", "step._head", "ternary._token"} <= set(report["hits"])
    assert report["threaded"] == ["ternary._ternary_rows"]          # the 1.58-bit kernel is always threaded
    _, report = run_worker(["tiny-f32"], cache)
    assert report["threaded"] == [] and report["misses"] == {}
    assert gufunc_files(cache) == []


ORDERS = [
    ["tiny-f32", "tiny-f64", "kernels"],
    ["kernels", "batch", "tiny-f64", "ternary"],
    ["smollm2-f64", "tiny-f32"],
    ["dense-f64", "wide-f32", "tiny-f64", "batch", "smollm2-f64"],
]


def test_processes_sharing_one_cache_in_any_order_then_from_it(tmp_path):
    """Fresh processes fill one new cache in several orders (tiny and SmolLM2-135M models, float32
    and float64, dense, sparse, a batch, 1.58 bits, the kernels called directly), then each history
    runs again from the filled cache: no crash, the same tokens, and nothing cached compiled again."""
    cache = tmp_path / "numba-cache"
    first = [run_worker(uses, cache)[0] for uses in ORDERS]
    assert any(p.suffix == ".nbi" for p in cache.rglob("*"))       # the leaves were cached
    assert gufunc_files(cache) == []
    runs = [run_worker(uses, cache) for uses in ORDERS]
    again = [out for out, _ in runs]
    assert again == first
    for uses, (_, report) in zip(ORDERS, runs):
        assert report["misses"] == {}, uses
        assert "step._layer" in report["hits"], uses
    seen = {}
    for out in first + again:                                       # a use gives one answer in every order
        for use, tokens in out.items():
            assert seen.setdefault(use, tokens) == tokens, use
