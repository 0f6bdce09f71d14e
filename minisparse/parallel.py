"""Data parallelism on the CPU: the batch split across threads, their gradients summed.

The loss is the mean over the N = B * T tokens of the batch. Split the B sequences into
parts p of N_p tokens each; then

    loss = sum_p (N_p / N) * loss_p          loss_p: the mean over part p's tokens
    grad = sum_p (N_p / N) * grad_p          each part's backward run with dloss = N_p / N

so the summed gradient is the full batch's gradient (up to float rounding: the sums are
made in another order). Top-K and N:M act per token, so a part sees the same masks it
would inside the full batch.

Why: NumPy runs every elementwise operation (norms, RoPE, softmax, ReLU2, top-K) on one
core, and BLAS gains less than 2x from 2 threads on small products (41 -> 27 ms a step's
worth at the benchmark's shapes). Here each thread runs the
whole forward and backward of its part on one core, with BLAS at one thread per caller,
and NumPy releases Python's GIL inside its operations, so the parts run at the same time.
On the 2-core benchmark machine a step takes 56 ms this way against 65 ms with one thread
(benchmarks/logs/cpu_train.txt), the same thread count PyTorch is given there. CPU only: on
the GPU, CuPy already runs each operation over the whole device.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from . import backend, model

_pools = {}


def cores():
    """The cores this process may use (Linux affinity where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(n_params):
    """--threads 0: one thread per core for models up to 20M parameters, else 1.

    Every extra thread holds a whole copy of the gradients until they are summed. For a
    small model that costs little, and splitting pays (0.8M parameters: 65 -> 56 ms a step
    on 2 cores). For a large one the matrix products dominate, BLAS already splits them
    well, and the copy is expensive: SmolLM2-135M took the same 3.6-3.8 s a step either way,
    and 2 threads needed 0.5 GB more memory."""
    return cores() if n_params <= 20_000_000 else 1


def split(B, threads):
    """Slices of the B sequences for min(threads, B) parts, sizes differing by at most 1."""
    parts = max(1, min(threads, B))
    bounds = [B * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def forward_backward(params, cfg, x, y, threads=1):
    """One training step's forward and backward on the batch (x, y): (B, T) token ids.

    Returns loss (a float), grads (a dict like params) and the measured sparsity,
    {layer: {site: fraction of zeros}} over the whole batch. threads=1 is the plain path:
    model.forward, then model.backward on the whole batch. The sparsity is measured before
    the backward, which frees each layer's activations as it goes (model.backward's consume)."""
    B, T = x.shape
    parts = split(B, threads)
    # BLAS at one thread per caller; without threadpoolctl (None) the batch is not split
    limit = backend.blas_threads(1) if len(parts) > 1 else None

    def run(part):
        w = (part.stop - part.start) / B                   # N_p / N: every sequence has T tokens
        loss, caches = model.forward(params, cfg, x[part], y[part])[1:]   # the logits are not kept
        zeros = model.measured_sparsity(cfg, caches)
        return w * float(loss), model.backward(params, cfg, caches, dloss=w, consume=True), w, zeros

    if limit is None:
        results = [run(slice(0, B))]
    else:
        if len(parts) not in _pools:
            _pools[len(parts)] = ThreadPoolExecutor(len(parts), thread_name_prefix="minisparse-part")
        with limit:
            results = list(_pools[len(parts)].map(run, parts))
    grads = results[0][1]
    for _, g, _, _ in results[1:]:
        for k in grads:
            grads[k] += g[k]
    zeros = {l: {site: sum(w * z[l][site] for _, _, w, z in results) for site in model.SITES}
             for l in range(cfg.n_layer)}
    return sum(r[0] for r in results), grads, zeros
