"""Data parallelism on the CPU: the batch split across threads, their gradients summed.

    fast.parallel.forward_backward(params, cfg, x, y, ops, threads)
    equals model.forward_backward(params, cfg, x, y, ops) up to float rounding (tests/test_parallel.py)
    fast.parallel.forward_loss(params, cfg, x, y, ops, threads)
    equals model.forward_loss(params, cfg, x, y, ops), the evaluation's forward (tests/test_parallel.py)

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

Evaluation (forward_loss) splits the batch the same way, but each part runs an inference forward
that keeps no caches (model.forward with keep_caches=False) and returns its logits and the counts
of nonzero projection inputs; the loss is then computed once over the whole batch's logits, as the
reference computes it, and the counts are summed, so neither needs a weighting.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from .. import model
from ..backend import array_module
from ..linear import sparse_linear_forward
from ..loss import IGNORE, cross_entropy_forward
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


def _pool(n):
    """The n worker threads, made once and reused by every step and evaluation."""
    if n not in _pools:
        _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="minisparse-part")
    return _pools[n]


def forward_backward(params, cfg, x, y, ops=model.REFERENCE, threads=1):
    """model.forward_backward on the batch (x, y), its B sequences split over `threads` threads:
    (loss, grads, measured sparsity {layer: {site: fraction of zeros}}) over the whole batch."""
    B, T = x.shape
    parts = split(B, threads)
    # BLAS at one thread per caller; without threadpoolctl (None) the batch is not split
    limit = blas_threads(1) if len(parts) > 1 else None
    if limit is None:
        return model.forward_backward(params, cfg, x, y, ops)
    weights = part_weights(y, parts)

    def run(i):
        return part_step(params, cfg, x, y, parts[i], weights[i], ops)

    with limit:
        results = list(_pool(len(parts)).map(run, range(len(parts))))
    return combine_steps(cfg, results)


def part_weights(y, parts):
    """N_p / N for each part: its share of the batch's counted tokens (0 where nothing is counted)."""
    counted = (y != IGNORE).sum(axis=1)                    # (B,) counted tokens of each sequence
    N = int(counted.sum())
    return [int(counted[part].sum()) / N if N else 0.0 for part in parts]


def part_step(params, cfg, x, y, part, w, ops):
    """One part's forward and backward, its loss weighted by w = N_p / N: (w * loss_p, grads of
    w * loss_p, the part's share of the sequences, its measured sparsity)."""
    loss, grads, zeros = model.forward_backward(params, cfg, x[part], y[part], ops, dloss=w)
    return w * loss, grads, (part.stop - part.start) / x.shape[0], zeros


def combine_steps(cfg, results, into=None):
    """The whole batch's (loss, grads, measured sparsity) from the parts' part_step results, in part
    order. The gradients are summed into the first part's arrays, or into `into`, a dict of arrays
    shaped like them (the same sums, written there)."""
    grads, rest = results[0][1], results[1:]
    if into is not None:
        for k in grads:
            if rest:
                array_module(grads[k]).add(grads[k], rest[0][1][k], out=into[k])
            else:
                into[k][...] = grads[k]
        grads, rest = into, rest[1:]
    for _, g, _, _ in rest:
        for k in grads:
            grads[k] += g[k]
    zeros = {l: {site: sum(w * z[l][site] for _, _, w, z in results) for site in model.SITES}
             for l in range(cfg.n_layer)}
    return sum(r[0] for r in results), grads, zeros


def forward_loss(params, cfg, x, y, ops=model.REFERENCE, threads=1):
    """model.forward_loss on the batch (x, y), its B sequences split over `threads` threads, each
    running a forward that keeps no caches: (loss, measured sparsity {layer: {site: fraction of
    zeros}}) over the whole batch. With one thread (or without threadpoolctl) the same forward runs
    whole on the calling thread."""
    B, T = x.shape
    parts = split(B, threads)
    limit = blas_threads(1) if len(parts) > 1 else None
    if limit is None:
        results = [part_forward(params, cfg, x, ops)]
    else:
        with limit:
            results = list(_pool(len(parts)).map(lambda part: part_forward(params, cfg, x[part], ops), parts))
    return combine_forwards(cfg, results, y)


def part_forward(params, cfg, x, ops):
    """One part's evaluation forward, keeping no caches: its logits (B_p, T, V) and, per (layer, site),
    (nonzero projection inputs, inputs)."""
    spec = cfg.spec
    counts = {}

    def project(l, site, h):                               # the default projection, counting as it goes
        ys, cache = sparse_linear_forward(h, [params[f"h.{l}.{n}"] for n in model.SITE_WEIGHTS[site]],
                                          spec, ops.sparsify)
        xs2 = cache[0]                                     # (N_p, D) the sparsified input
        counts[l, site] = (int(array_module(xs2).count_nonzero(xs2 != 0)), xs2.size)
        return ys
    logits, _, _ = model.forward(params, cfg, x, None, ops, project=project, keep_caches=False)
    return logits, counts


def combine_forwards(cfg, results, y):
    """(loss, measured sparsity) of the whole batch from the parts' part_forward results, in part
    order: the loss computed once over all the logits, as the reference computes it."""
    B, T = y.shape
    logits = array_module(results[0][0]).concatenate([r[0] for r in results])      # (B, T, V)
    loss, _ = cross_entropy_forward(logits.reshape(B * T, -1), y.reshape(-1))
    zeros = {}
    for l in range(cfg.n_layer):
        zeros[l] = {}
        for site in model.SITES:
            nonzero = sum(r[1][l, site][0] for r in results)
            size = sum(r[1][l, site][1] for r in results)
            zeros[l][site] = 1.0 - nonzero / size          # as linear.zero_fraction counts it
    return float(loss), zeros
