"""Data parallelism on the CPU: the batch split across threads, their gradients summed.

The loss is the mean over the N = B * T tokens of the batch. Split the B sequences into
parts p of N_p tokens each; then

    loss = sum_p (N_p / N) * loss_p          loss_p: the mean over part p's tokens
    grad = sum_p (N_p / N) * grad_p          each part's backward run with dloss = N_p / N

so the summed gradient is the full batch's gradient (up to float rounding: the sums are
made in another order). Top-K and N:M act per token, so a part sees the same masks it
would inside the full batch.

Why: NumPy runs every elementwise operation (norms, RoPE, softmax, ReLU2, top-K) on one
core, and small matrix products split poorly over BLAS threads. Here each thread runs the
whole forward and backward of its part on one core, with BLAS at one thread per caller,
and NumPy releases Python's GIL inside its operations, so the parts run at the same time.
On the 2-core benchmark machine this takes a step from 59 to 47 ms (benchmarks/
train_speed.py), with the same thread count PyTorch is given there. CPU only: on the GPU,
CuPy already runs each operation over the whole device.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from . import model

_pools = {}


def default_threads():
    """The cores this process may use (Linux affinity where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        return os.cpu_count() or 1


def _blas_at_one_thread():
    """A context in which BLAS runs each call in its caller's thread (threadpoolctl), or None
    when threadpoolctl is missing: then the parts are not run in parallel."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1, user_api="blas")


def split(B, threads):
    """Slices of the B sequences for min(threads, B) parts, sizes differing by at most 1."""
    parts = max(1, min(threads, B))
    bounds = [B * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def forward_backward(params, cfg, x, y, threads=1):
    """loss (a float), grads (dict like params) and a list of (tokens, caches), one per part.

    threads=1 is the plain path: model.forward then model.backward on the whole batch."""
    B, T = x.shape
    parts = split(B, threads)
    limit = _blas_at_one_thread() if len(parts) > 1 else None
    if limit is None:
        _, loss, caches = model.forward(params, cfg, x, y)
        return float(loss), model.backward(params, cfg, caches), [(B * T, caches)]

    def run(part):
        n = (part.stop - part.start) * T
        _, loss, caches = model.forward(params, cfg, x[part], y[part])
        return n / (B * T) * float(loss), model.backward(params, cfg, caches, dloss=n / (B * T)), (n, caches)

    if len(parts) not in _pools:
        _pools[len(parts)] = ThreadPoolExecutor(len(parts), thread_name_prefix="minisparse-part")
    with limit:
        results = list(_pools[len(parts)].map(run, parts))
    grads = results[0][1]
    for _, g, _ in results[1:]:
        for k in grads:
            grads[k] += g[k]
    return sum(r[0] for r in results), grads, [r[2] for r in results]


def mean_sparsity(cfg, parts):
    """model.mean_sparsity over the whole batch: each part's, weighted by its tokens."""
    N = sum(n for n, _ in parts)
    per_part = [(n, model.mean_sparsity(cfg, caches)) for n, caches in parts]
    return {site: sum(n * s[site] for n, s in per_part) / N for site in model.SITES}


def measured_sparsity(cfg, parts):
    """model.measured_sparsity over the whole batch: {layer: {site: fraction of zeros}}."""
    N = sum(n for n, _ in parts)
    per_part = [(n, model.measured_sparsity(cfg, caches)) for n, caches in parts]
    return {l: {site: sum(n * m[l][site] for n, m in per_part) / N for site in model.SITES}
            for l in range(cfg.n_layer)}
