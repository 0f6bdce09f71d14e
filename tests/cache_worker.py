"""One process's use of the compiled kernels, for tests/test_jit.py: each argument names a use,
run in order; prints one line per use with its greedy float64 tokens (or a checksum of a kernel's
output), so that runs from a fresh cache and from a filled one can be compared, then a line
`cache {...}`: what this process compiled and what it loaded from the cache (cache_report).

    python tests/cache_worker.py tiny-f32 tiny-f64 smollm2-f64 batch kernels ternary

The use `planted` breaks the rule of fast/jit.py on purpose (a cached function that calls a
threaded one by name), so that the test can show its check of the cache's files finds that.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from minisparse import model  # noqa: E402
from minisparse.fast.decode import decode_weights  # noqa: E402
from minisparse.sampling import generate  # noqa: E402


@numba.njit(parallel=True)
def _planted_threads(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1


@numba.njit(cache=True)
def _planted_caller(a):
    _planted_threads(a)                         # by name: its gufunc is copied into this cached code


def tiny(dtype, sparsity, n_embd=64, extra=()):
    cfg = model.GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=n_embd, activation="relu2",
                          sparsity=sparsity, **dict(extra))
    return {k: v.astype(dtype) for k, v in model.init_params(cfg, seed=0).items()}, cfg


def greedy(params, cfg, prompt, B=1, n=6):
    ids = np.array([prompt] * B, dtype=np.int64)
    fast = decode_weights(params, cfg, cfg.spec, "auto", B)
    out = generate(params, cfg, ids, n, 0.0, None, np.random.default_rng(0), cfg.spec, None, fast)
    return out[:, len(prompt):].tolist()


def use(name):
    if name in ("tiny-f32", "tiny-f64", "dense-f64", "wide-f32"):
        dtype = np.float32 if name.endswith("f32") else np.float64
        params, cfg = tiny(dtype, 0.0 if name.startswith("dense") else 0.5, 256 if name.startswith("wide") else 64)
        return greedy(params, cfg, [1, 2, 3, 4, 5])
    if name == "batch":                         # 3 samples a call: the union kernel, no step
        params, cfg = tiny(np.float64, 0.5)
        return greedy(params, cfg, [7, 8], B=3)
    if name == "smollm2-f64":
        from minisparse import pretrained
        params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=64, dtype=np.float64)
        from dataclasses import replace
        cfg = replace(cfg, sparsity=0.5)
        return greedy(params, cfg, tok.encode("The capital of France is"), n=3)
    if name == "kernels":                       # the suite's direct calls of the threaded kernels
        from minisparse.fast import rowsparse as fr
        rng = np.random.default_rng(0)
        Wt = rng.standard_normal((300, 5000)).astype(np.float32)
        idx = np.sort(rng.choice(300, 120, replace=False))
        y = fr.rows_matvec_numba(rng.standard_normal(120).astype(np.float32), idx, Wt)
        xs = rng.standard_normal((3, 300)) * (rng.random((3, 300)) < 0.3)
        u, _ = fr.union_rows_matmul_numba(xs.astype(np.float32), Wt)
        return [round(float(y.sum()), 2), round(float(u.sum()), 2)]
    if name == "ternary":                       # 1.58-bit decode through the 2-bit kernel (wide enough for it)
        params, cfg = tiny(np.float32, 0.5, 256, extra=dict(w_bits=1.58, a_bits=8))
        return greedy(params, cfg, [1, 2, 3])
    if name == "planted":
        a = np.zeros(8)
        _planted_caller(a)
        return float(a.sum())
    raise SystemExit(f"unknown use {name!r}")


def cache_report():
    """{"hits": {f: loads from the cache}, "misses": {f: compilations}} for the cached functions of
    minisparse.fast that ran here, and "threaded": the threaded ones this process compiled."""
    from minisparse.fast import jit, rowsparse, step, ternary
    out = {"hits": {}, "misses": {}, "threaded": []}
    found = {f for module in (step, rowsparse, ternary) for f in vars(module).values()
             if isinstance(f, jit.numba.core.dispatcher.Dispatcher)}     # each once (ternary imports step's)
    for f in sorted(found, key=lambda f: (f.py_func.__module__, f.py_func.__qualname__)):
        name = f"{f.py_func.__module__.rsplit('.', 1)[1]}.{f.py_func.__qualname__}"
        if jit.threads(f):
            out["threaded"] += [name] if f.signatures else []
        elif jit.cached(f):
            for kind in ("hits", "misses"):
                count = sum(getattr(f.stats, "cache_" + kind).values())
                if count:
                    out[kind][name] = count
    return out


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name, use(name), flush=True)
    print("cache", json.dumps(cache_report()), flush=True)
