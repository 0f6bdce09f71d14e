"""Data parallelism on the CPU: the batch split across threads, their gradients summed.

    fast.parallel.forward_backward(params, cfg, x, y, ops, threads)
    equals model.forward_backward(params, cfg, x, y, ops) up to float rounding (tests/test_parallel.py)

The loss is the mean over the N counted tokens of the batch (every target but loss.IGNORE:
all B * T when pretraining; only the responses when finetuning, sft.py). Split the B
sequences into parts p holding N_p counted tokens each; then

    loss = sum_p (N_p / N) * loss_p          loss_p: the mean over part p's counted tokens
    grad = sum_p (N_p / N) * grad_p          each part's backward run with dloss = N_p / N

so the summed gradient is the full batch's gradient (up to float rounding: the sums are
made in another order). The weights count tokens, not sequences: with masking one part
may hold a long response and another a short one, and weighting them by their sequences
would give the short one's tokens more say. A batch with nothing counted (N = 0) has loss
and gradient 0, as loss.py defines it. Top-K and N:M act per token, so a part sees the
same masks it would inside the full batch; the measured sparsity is over all B * T
positions, so its parts are weighted by their sequences.

Why: NumPy runs every elementwise operation (norms, RoPE, softmax, ReLU2, top-K) on one
core, and BLAS gains little from several threads on small products. Here each thread runs the
whole forward and backward of its part on one core, with BLAS at one thread per caller, and
NumPy releases Python's GIL inside its operations, so the parts run at the same time
(benchmarks/RESULTS.md). CPU only: on the GPU, CuPy already runs each operation over the
whole device.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from .. import model
from ..loss import IGNORE
from .runtime import blas_threads

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
    small model that costs little, and splitting pays. For a large one the matrix products
    dominate, BLAS already splits them well, and the copy is expensive: SmolLM2-135M steps no
    faster split, and needs more memory (benchmarks/RESULTS.md)."""
    return cores() if n_params <= 20_000_000 else 1


def split(B, threads):
    """Slices of the B sequences for min(threads, B) parts, sizes differing by at most 1."""
    parts = max(1, min(threads, B))
    bounds = [B * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def forward_backward(params, cfg, x, y, ops=model.REFERENCE, threads=1):
    """model.forward_backward on the batch (x, y), its B sequences split over `threads` threads:
    (loss, grads, measured sparsity {layer: {site: fraction of zeros}}) over the whole batch."""
    B, T = x.shape
    parts = split(B, threads)
    # BLAS at one thread per caller; without threadpoolctl (None) the batch is not split
    limit = blas_threads(1) if len(parts) > 1 else None
    if limit is None:
        return model.forward_backward(params, cfg, x, y, ops)

    counted = (y != IGNORE).sum(axis=1)                    # (B,) counted tokens of each sequence
    N = int(counted.sum())

    def run(part):
        w = int(counted[part].sum()) / N if N else 0.0     # N_p / N, by counted tokens
        loss, grads, zeros = model.forward_backward(params, cfg, x[part], y[part], ops, dloss=w)
        return w * loss, grads, (part.stop - part.start) / B, zeros

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
