"""Row-sparse decoding: the weights of the sparsified projections stored input-major, and the
products that read only the rows a token selected.

    DecodeWeights(params, cfg, method).project(l, site, x, spec)
    equals sparse_linear_forward(x, [W_i], spec)[0] up to float32 rounding (tests/test_rowsparse.py)

Each token's input x (D,) is sparsified (and quantized, for a 1.58-bit model), and
y = xs[idx] @ Wt[idx] reads only the rows idx where xs is nonzero (rowsparse.py). method
"gather" runs rowsparse.py's reference; the others fast/rowsparse.py's kernels; "auto" takes the
row-sparse product only where fast.rowsparse.auto_method says it pays, and leaves the other
projections to the masked product (decode.py). A 1.58-bit model (w_bits 1.58, a_bits 8) on the CPU
stores its projections packed, 2 bits a weight (ternary.py), and multiplies INT8 codes by them:
with numba through fast/ternary.py (the selection, the quantization and the kernel), else (and
with method "gather") through ternary.py's reference. On the GPU it keeps float copies of the
ternary weights.

With numba, DecodeWeights also builds the compiled decode step (fast/step.py) for 16-bit models:
every site's input-major Wt, so that a single token's whole step runs compiled, dense included;
`DecodeWeights.decode_forward` is what a decode loop calls.

A call of several tokens (a batch of samples) multiplies them together, reading the union of
their selected rows once (rowsparse.union_rows_matmul; numba's kernel where it is installed).
Where the weights are used as they are (16 bits), the input-major copy is the only one: the
model's params entries become views of it, W_i = Wt[:, cols_i].T, so the masked product of a
prefill or a large batch multiplies the same memory (BLAS reads a transposed view in place).
"""

import contextlib

import numpy as np

from .. import rowsparse, ternary
from ..backend import array_module
from ..decode import new_cache
from ..linear import SparseSpec, quantized_input, quantized_weights
from ..model import SITE_WEIGHTS
from . import rowsparse as fast_rowsparse
from . import step as fast_step
from . import ternary as fast_ternary
from .runtime import blas_thread_count, blas_threads, short_blas_idle
from .topk import sparsify as fast_sparsify


def decode_weights(params, cfg, spec, kernel="auto", rows=1):
    """The DecodeWeights a decode of `spec` (a SparseSpec, or a plan) with calls of `rows` tokens
    reads, or None where nothing would read them: kernel 'masked'; calls of more tokens than
    fast.rowsparse.auto_max_rows, which every projection multiplies masked (a large batch: without
    DecodeWeights, BLAS also keeps its threads, where quiet() would hold it at one); or a dense
    spec that the compiled step does not serve (several tokens a call, the GPU, no numba, INT8 or
    1.58-bit), which the plain product decodes as well without them."""
    xp = array_module(params["wte"])
    if kernel == "masked" or rows > fast_rowsparse.auto_max_rows(xp):
        return None
    if isinstance(spec, SparseSpec) and spec.dense and not (
            rows == 1 and fast_step.applies(cfg, spec, kernel, xp)):
        return None
    return DecodeWeights(params, cfg, kernel)


class DecodeWeights:
    """Input-major Wt (D, sum O_i) of the projections to decode row-sparse, and the method.

    params' entries of those projections are replaced, in place, by views of Wt (16-bit weights:
    one copy in memory; 1.58-bit ones keep their latent weights beside the packed or ternarized
    copy). max_rows: calls with more tokens than this (a prefill, a large batch) take the masked
    product; None: fast.rowsparse.auto_max_rows, the measured crossover. min_weights: auto_method's
    threshold. step: the compiled decode step (fast/step.py) with every site's Wt, or None (no numba,
    another method, INT8 or 1.58-bit, the GPU); self.wt still holds only the sites auto_method chose."""

    def __init__(self, params, cfg, method="auto", max_rows=None, min_weights=fast_rowsparse.AUTO_MIN_WEIGHTS):
        xp = array_module(params["wte"])
        self.max_rows = fast_rowsparse.auto_max_rows(xp) if max_rows is None else max_rows
        self.method = method
        self.ternary = cfg.w_bits == 1.58 and cfg.a_bits == 8 and xp is np     # packed, 2 bits a weight
        self.wt = {}                           # (layer, site) -> (Wt or TernaryWeights, [O_i]); absent: masked
        # the compiled step (fast/step.py) decodes a single token with every site's Wt, chosen or not
        steps = fast_step.applies(cfg, cfg.spec, method, xp)
        step_wts = [[] for _ in range(cfg.n_layer)]
        for l in range(cfg.n_layer):
            for site, names in SITE_WEIGHTS.items():
                Ws = [params[f"h.{l}.{n}"] for n in names]                        # the latent weights
                chosen = method
                if method == "auto":
                    chosen = fast_rowsparse.auto_method(xp, Ws[0].shape[1] * sum(W.shape[0] for W in Ws),
                                                        min_weights)
                    if chosen is None and not steps:
                        continue               # the masked product is as fast or faster here
                    self.method = chosen or self.method
                if self.ternary:               # quantized and packed by ternary.py
                    packed = ternary.pack_weights(Ws)
                    self.wt[l, site] = (packed, packed.sizes)
                else:                          # ternarized in float if 1.58-bit (GPU), else as they are
                    Wq = quantized_weights(Ws, cfg.spec)
                    Wt = rowsparse.input_major(Wq)
                    if chosen is not None:     # else only the step reads it row-sparse
                        self.wt[l, site] = (Wt, [W.shape[0] for W in Wq])
                    step_wts[l].append(Wt)
                    if cfg.w_bits == 16:       # the masked product reads Wt too: drop the (O, D) copy
                        start = 0
                        for n, W in zip(names, Ws):
                            params[f"h.{l}.{n}"] = Wt[:, start:start + W.shape[0]].T      # (O_i, D) view
                            start += W.shape[0]
                    del Ws, Wq
        self.step = fast_step.Step(step_wts) if steps else None
        # the BLAS threads a prefill may take back (prefill()): what BLAS has now, outside quiet()
        self.prefill_threads = blas_thread_count() if self.step is not None else None
        # what a decode loop calls, with decode.decode_forward's signature (and fast=self): one token
        # through the compiled step where it applies, anything else through decode.decode_forward
        self.decode_forward = fast_step.decode_forward
        self._warm_up(xp)
        if self.step is not None:              # compile (or load) the step now, on a throwaway cache
            fast_step.decode_forward(params, cfg, np.zeros((1, 1), dtype=np.int64), new_cache(params, cfg, 1),
                                     None, None, self)

    def _warm_up(self, xp):
        """Compile the kernels now, not in the first token, so that a decode's time is the decode's:
        CUDA once per input width D (NVRTC compiles each), numba once (its first call loads the
        compiled kernel from its cache and starts its threads)."""
        if self.ternary:
            if fast_ternary.numba is not None and self.wt and self.method != "gather":
                tw = next(iter(self.wt.values()))[0]
                x = np.ones(tw.packed.shape[0], dtype=tw.col_scale.dtype)
                fast_ternary.ternary_sparse_matvec(x, SparseSpec(0.0, a_bits=8, w_bits=1.58), tw)
            return
        warm = list({wt.shape[0]: wt for wt, _ in self.wt.values()}.values())   # one Wt per input width
        if xp is np:
            warm = warm[:1] if self.method == "numba" else []
        for wt in warm:
            fast_rowsparse.topk_rows_matvec(xp.zeros(wt.shape[0], dtype=wt.dtype), 1, wt, self.method)
            if xp is np and self.max_rows > 1:     # the batched kernel, for --num_samples > 1
                fast_rowsparse.union_rows_matmul(np.ones((2, wt.shape[0]), dtype=wt.dtype), wt, self.method)

    def serves(self, spec):
        """Whether a decode of `spec` should pass these weights: a sparse spec or a plan always; a dense
        one where the compiled step decodes it (else it takes the plain product, BLAS on its threads)."""
        return not (isinstance(spec, SparseSpec) and spec.dense) or self.step is not None

    def quiet(self):
        """The context to decode in: BLAS on one thread while numba's kernel or step runs (fast/rowsparse.py)."""
        if self.step is not None:              # the compiled step's threads, whatever self.wt holds
            return fast_rowsparse.quiet_blas("numba")
        if not self.wt or array_module(next(iter(self.wt.values()))[0]) is not np:
            return contextlib.nullcontext()
        return fast_rowsparse.quiet_blas(self.method)

    def prefill(self):
        """The context for a call of many tokens (a prompt's prefill) inside quiet(): BLAS back on
        the threads it had when these weights were built (every core, unless the user limited it),
        where the compiled step decodes the tokens that follow (so BLAS is idle after the prefill)
        and OpenBLAS's idle threads go to sleep at once (runtime.short_blas_idle: generate.py sets
        OPENBLAS_THREAD_TIMEOUT before NumPy loads). Elsewhere nothing changes.

        Why: a prefill's products have many rows, and BLAS shares them well between the cores. Left
        spinning after the prefill, OpenBLAS's threads would take a core from the step's threads, and
        the first tokens would lose about what the prefill gained (benchmarks/RESULTS.md)."""
        several = self.prefill_threads is not None and self.prefill_threads > 1
        limit = blas_threads(self.prefill_threads) if several and short_blas_idle() else None
        return contextlib.nullcontext() if limit is None else limit

    def select(self, row, spec, wt):
        """One token's input row (D,) -> y (sum O_i,), rows read."""
        if self.ternary:                       # INT8 codes times the packed ternary rows (ternary.py)
            if fast_ternary.numba is not None and self.method != "gather":
                return fast_ternary.ternary_sparse_matvec(row, spec, wt)
            return ternary.ternary_sparse_matvec(row, spec, wt)
        if self.method == "gather":            # the reference (rowsparse.py)
            return rowsparse.sparse_rows_matvec(row, spec, wt)
        if spec.a_bits != 16:                  # INT8 inputs: the reference selection, then the kernel
            xs = quantized_input(row[None], spec)[0][0]                # (D,) sparsified and quantized
            idx = array_module(row).flatnonzero(xs)
            return fast_rowsparse.rows_matvec(xs[idx], idx, wt, self.method), idx.shape[0]
        if spec.nm is None:
            return fast_rowsparse.topk_rows_matvec(row, spec.kept(row.shape[0]), wt, self.method)
        return fast_rowsparse.nm_rows_matvec(row, spec.nm[0], spec.nm[1], wt, self.method)

    def project(self, l, site, x, spec):
        """x (B, T, D) -> ([y_i (B, T, O_i)], kept): each token reads only its selected rows; several
        tokens read the union of theirs once. kept: the inputs kept, summed over the tokens (what
        the sparsity meter counts), an int, or on the GPU a device scalar (reading it would sync)."""
        wt, sizes = self.wt[l, site]
        B, T, D = x.shape
        xs = x.reshape(B * T, D)                                        # (N, D)
        if B * T == 1:                         # one token, the usual decode step: no copy, no sum
            y, read = self.select(xs[0], spec, wt)
            y = y[None]
        elif not self.ternary and array_module(x) is np:       # several tokens: their union, read once
            if self.method == "gather":        # the reference, selection included (rowsparse.py)
                xq = quantized_input(xs, spec)[0]                           # (N, D)
                y = rowsparse.union_rows_matmul(xq, wt)[0]
            else:
                xq = quantized_input(xs, spec, fast_sparsify)[0]
                y = fast_rowsparse.union_rows_matmul(xq, wt, self.method)[0]
            read = int(np.count_nonzero(xq))
        else:                                  # each token its own rows (GPU: no sync for top-K)
            y = array_module(x).empty((B * T, sum(sizes)), dtype=x.dtype)
            read = 0
            for n in range(B * T):
                y[n], r = self.select(xs[n], spec, wt)
                read = read + r
        ys, start = [], 0
        for O in sizes:
            ys.append(y[:, start:start + O].reshape(B, T, O))
            start += O
        return ys, read
