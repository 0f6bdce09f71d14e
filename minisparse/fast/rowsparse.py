"""Fast row-sparse products: rowsparse.py's functions with kernels that read each selected row once.

    rows_matvec(vals, idx, Wt, method)        equals rowsparse.rows_matvec(vals, idx, Wt)
    topk_rows_matvec(x, k, Wt, method)        equals rowsparse.sparse_rows_matvec(x, SparseSpec(S), Wt)
    nm_rows_matvec(x, keep, block, Wt, method) equals rowsparse.sparse_rows_matvec(x, SparseSpec(nm=...), Wt)
    union_rows_matmul(xs, Wt, method)         equals rowsparse.union_rows_matmul(xs, Wt): B tokens at once
    up to float32 rounding (tests/test_rowsparse.py, on every method), with K = kept_count(D, S)

The reference `vals @ Wt[idx]` copies the K selected rows to a new (K, O) array, then BLAS reads
that copy again: twice the traffic plus an allocation. The methods:
  "gather":  the reference itself.
  "chunked": the same sum, gathered `chunk` rows at a time into one reused buffer small enough
             to stay in cache, so main memory is read once; pure NumPy. NumPy still copies each
             row before BLAS reads it, so it does not beat the masked dense product (auto_sites).
  "numba":   a compiled kernel that reads each selected row once, with no copy, threads
             splitting the outputs; used when numba is installed (it is optional).
On CuPy arrays the CUDA kernels of rowsparse.cu run instead, whatever the method:
`rows_matvec_cuda` for given indices, and `topk_rows_matvec_cuda`, which also selects the top-K
on the device, so that a decode step never waits for the host. `radix_select` is that kernel's
selection written in NumPy, so that it can be read and tested without a GPU.

`auto_method` is the one place that says which projections `--kernel auto` decodes row-sparse,
and up to which batch.
"""

import contextlib
import os

import numpy as np

from ..backend import array_module
from ..rowsparse import rows_matvec as rows_matvec_gather
from ..rowsparse import union_rows_matmul as union_rows_matmul_gather
from .jit import njit, numba          # numba optional (pip install numba): None where absent
from .runtime import blas_threads
from .topk import topk_nonzero

METHODS = ("gather", "chunked", "numba", "auto")


def rows_matvec_chunked(vals, idx, Wt, chunk=32):
    """y = sum over chunks c of vals[c] @ Wt[idx[c]], gathering `chunk` rows at a time.

    Why: `Wt[idx]` for all K rows writes K*O floats to a fresh array and reads them back;
    a 32-row chunk of a 12288-wide Wt is 1.5 MB, which stays in L2/L3 between the gather
    (np.take into one buffer per call, reused by every chunk) and the product."""
    K, O = idx.shape[0], Wt.shape[1]
    buf = np.empty((chunk, O), dtype=Wt.dtype)                 # reused by every chunk of this call
    y = np.zeros(O, dtype=np.result_type(vals, Wt))
    for s in range(0, K, chunk):
        n = min(chunk, K - s)
        np.take(Wt, idx[s:s + n], axis=0, out=buf[:n])
        y += vals[s:s + n] @ buf[:n]
    return y


if numba is not None:
    @njit(parallel=True, fastmath=True, error_model="numpy")
    def _numba_rows_matvec(vals, idx, Wt, y, tile):
        # Threads take separate tiles of the outputs (no reduction between threads). In a
        # tile, 4 selected rows are added per pass: the partial sum y[j0:j1] (<= 16 KB) is read
        # and written once per 4 rows instead of once per row, and stays in L1; each row
        # segment is read once, contiguously. fastmath lets LLVM vectorize the inner loop. It
        # returns nothing, as a kernel (fast/jit.py) must: fast/step.py's layer runs it as one.
        O, K = y.shape[0], idx.shape[0]
        for t in numba.prange((O + tile - 1) // tile):
            j0 = t * tile
            j1 = min(O, j0 + tile)
            acc = y[j0:j1]
            acc[:] = 0
            k = 0
            while k + 4 <= K:
                v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
                r0, r1 = Wt[idx[k], j0:j1], Wt[idx[k + 1], j0:j1]
                r2, r3 = Wt[idx[k + 2], j0:j1], Wt[idx[k + 3], j0:j1]
                for j in range(j1 - j0):
                    acc[j] += v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j]
                k += 4
            while k < K:
                v, r = vals[k], Wt[idx[k], j0:j1]
                for j in range(j1 - j0):
                    acc[j] += v * r[j]
                k += 1


if numba is not None:
    @njit(parallel=True, fastmath=True, error_model="numpy")
    def _numba_union_matmul(vals, idx, Wt, y, tile):
        # The batched kernel: as _numba_rows_matvec, with B accumulators per output tile. Each
        # selected row segment is read from memory once and added, with each token's value, to
        # every token's partial sum; B * tile floats of sums stay in L1/L2 while the rows stream.
        B, O = y.shape
        K = idx.shape[0]
        for t in numba.prange((O + tile - 1) // tile):
            j0 = t * tile
            j1 = min(O, j0 + tile)
            for b in range(B):
                y[b, j0:j1] = 0
            k = 0
            while k + 4 <= K:
                r0, r1 = Wt[idx[k], j0:j1], Wt[idx[k + 1], j0:j1]
                r2, r3 = Wt[idx[k + 2], j0:j1], Wt[idx[k + 3], j0:j1]
                for b in range(B):
                    v0, v1, v2, v3 = vals[k, b], vals[k + 1, b], vals[k + 2, b], vals[k + 3, b]
                    acc = y[b, j0:j1]
                    for j in range(j1 - j0):
                        acc[j] += v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j]
                k += 4
            while k < K:
                r = Wt[idx[k], j0:j1]
                for b in range(B):
                    v = vals[k, b]
                    acc = y[b, j0:j1]
                    for j in range(j1 - j0):
                        acc[j] += v * r[j]
                k += 1
        return y


def _tiles(O, tile):
    """A tile width for O outputs: a multiple of the thread count of equal tiles, each at most
    `tile` wide, so every thread gets the same share (3 tiles on 2 threads would leave one idle
    a third of the time)."""
    P = numba.get_num_threads()
    n_tiles = P * -(-O // (P * tile))
    return max(16, -(-O // n_tiles))


def union_rows_matmul_numba(xs, Wt, tile=0):
    """rowsparse.union_rows_matmul with the compiled kernel: xs (B, D) sparsified -> (y (B, O), |u|).
    tile 0: B tokens' sums of one tile kept to about 32 KB (at most 4096 outputs, at least 256)."""
    if numba is None:
        raise RuntimeError("the 'numba' method needs numba: pip install numba")
    B, O = xs.shape[0], Wt.shape[1]
    u = np.flatnonzero((xs != 0).any(axis=0))                    # (|u|,) the union, ascending
    dt = np.result_type(xs, Wt)                                  # float64 inputs keep their sums in float64
    vals = np.ascontiguousarray(xs[:, u].T, dtype=dt)            # (|u|, B): one row's B values together
    tile = _tiles(O, tile or min(4096, max(256, 8192 // B)))
    y = np.empty((B, O), dtype=dt)
    return _numba_union_matmul(vals, u, Wt, y, tile), int(u.shape[0])


def union_rows_matmul(xs, Wt, method="auto"):
    """rowsparse.union_rows_matmul by `method` (one of METHODS): numba's kernel, else the reference
    (NumPy's gather copies the union's rows, which is what 'chunked' avoids only for one token)."""
    if array_module(Wt) is np and (method == "numba" or (method == "auto" and numba is not None)):
        return union_rows_matmul_numba(xs, Wt)
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    return union_rows_matmul_gather(xs, Wt)


def rows_matvec_numba(vals, idx, Wt, tile=4096):
    """The compiled kernel: reads each of the K selected rows once. Needs numba.

    tile: the widest output tile. With the weights in main memory, longer contiguous row
    segments read faster (benchmarks/RESULTS.md has the tile sizes measured)."""
    if numba is None:
        raise RuntimeError("the 'numba' method needs numba: pip install numba")
    O, P = Wt.shape[1], numba.get_num_threads()
    # a multiple of the thread count of equal tiles, each at most `tile` wide, so every
    # thread gets the same share (3 tiles on 2 threads would leave one idle a third of the time)
    n_tiles = P * -(-O // (P * tile))
    tile = max(16, -(-O // n_tiles))
    dt = np.result_type(vals, Wt)                   # as rows_matvec_chunked: float64 inputs, float64 sums
    y = np.empty(O, dtype=dt)
    _numba_rows_matvec(vals.astype(dt, copy=False), idx, Wt, y, tile)
    return y


# The GPU path: two CUDA kernels in rowsparse.cu (top-K selection on the device, then the
# row-sparse product), compiled by CuPy on first use.
CUDA_MAX_D = 1024 * 16                   # topk_select: one block of 1024 threads, <= 16 entries each
_cuda_modules = {}
_cuda_scratch = {}


def _cuda_kernel(name, unroll=8, per_thread=16):
    """The kernel `name` of rowsparse.cu, compiled once per (unroll, per_thread): the rows whose loads
    rows_matvec keeps in flight, and the entries each thread of topk_select holds in registers. The
    selection's loops are unrolled to per_thread, so it is compiled for the smallest power of 2 that
    holds D: fewer registers per thread select faster (benchmarks/logs/gpu_select.txt)."""
    import cupy as cp
    if (unroll, per_thread) not in _cuda_modules:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rowsparse.cu")) as f:
            _cuda_modules[unroll, per_thread] = cp.RawModule(
                code=f.read(), options=(f"-DROWS_UNROLL={unroll}", f"-DSELECT_PER_THREAD={per_thread}"))
    return _cuda_modules[unroll, per_thread].get_function(name)


def cuda_rows_per_block(K, O):
    """How many selected rows one block of rows_matvec takes: about 6 blocks per SM in all, each
    at least 8 rows and at most 64 (fewer rows: more atomics; more: too few blocks to keep the
    memory busy); the measurements behind the rule are in benchmarks/RESULTS.md."""
    import cupy as cp
    dev = cp.cuda.Device()
    if ("sms", dev.id) not in _cuda_scratch:
        _cuda_scratch["sms", dev.id] = dev.attributes["MultiProcessorCount"]
    rows = K * -(-O // 1024) / (6 * _cuda_scratch["sms", dev.id])
    return int(min(64, max(8, 2 ** round(np.log2(max(rows, 1))))))


def _cuda_rows(vals, idx, count, K, Wt, y, rows_per_block, unroll, per_thread=16):
    """Launch rows_matvec for (up to) K selected rows: y += vals[:n] @ Wt[idx[:n]], n = count or K.
    The kernel reads raw memory with O as the row stride: Wt must be C-contiguous."""
    if not Wt.flags.c_contiguous:
        raise ValueError("the CUDA row-sparse kernel needs a C-contiguous Wt (rowsparse.input_major makes one)")
    O = Wt.shape[1]
    rows_per_block = rows_per_block or cuda_rows_per_block(K, O)
    grid = ((O + 1023) // 1024, max(1, (K + rows_per_block - 1) // rows_per_block))
    _cuda_kernel("rows_matvec", unroll, per_thread)(
        grid, (256,), (vals, idx, count if count is not None else idx, np.int32(count is not None),
                       np.int32(K), Wt, y, np.int32(O), np.int32(rows_per_block)))
    return y


def rows_matvec_cuda(vals, idx, Wt, rows_per_block=0, unroll=8):
    """The GPU kernel (CuPy, float32): y = vals @ Wt[idx] without copying the rows.
    rows_per_block 0: cuda_rows_per_block's choice."""
    import cupy as cp
    y = cp.zeros(Wt.shape[1], dtype=cp.float32)
    return _cuda_rows(cp.ascontiguousarray(vals, dtype=cp.float32), cp.ascontiguousarray(idx, dtype=cp.int64),
                      None, idx.shape[0], Wt, y, rows_per_block, unroll)


def radix_select(x, k):
    """The selection of rowsparse.cu's topk_select, in NumPy, so that the kernel's algorithm can
    be read and checked without a GPU: for one row x (D,), the ascending positions it keeps,
    equal to topk.topk_nonzero(x, k) (tests/test_rowsparse.py).

    key = the bits of |x| as uint32 (for floats >= 0 the order of the bits is the order of the
    values). The K-th largest key t is found a byte at a time from the top: among the keys that
    start with the bytes found so far, count each value of the next byte and take the byte where
    the count from the top reaches `rest`, the number still to keep. Kept: key > t, and the first
    `rest` keys equal to t > 0 by position. If the whole byte's keys are kept, the search stops
    early with t just below them."""
    key = np.abs(np.asarray(x, dtype=np.float32)).view(np.uint32)       # (D,)
    D = key.shape[0]
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    t, rest = 0, 0                                   # k >= D: every nonzero key
    if k < D:
        prefix, high, rest = 0, 0, k
        for shift in (24, 16, 8, 0):
            hist = np.bincount((key[(key & high) == prefix] >> shift) & 255, minlength=256)   # (256,)
            above = hist[::-1].cumsum()[::-1] - hist                # keys in higher bytes than b
            byte = int(np.flatnonzero((above < rest) & (rest <= above + hist))[0])
            prefix |= byte << shift
            high |= 255 << shift
            rest -= int(above[byte])
            if rest == hist[byte]:                   # the whole byte is kept: key >= prefix
                t, rest = max(prefix - 1, 0), 0
                break
            t = prefix
    tie = (key == t) & (t > 0)
    keep = (key > t) | (tie & (np.cumsum(tie) <= rest))
    return np.flatnonzero(keep)


def _select_buffers(D):
    """idx (D,) int64 and vals (D,) float32 for topk_select, made once per D and device and
    reused: rows_matvec reads them before the next call's topk_select writes them, as both run in
    order on one stream (a caller running projections on several streams at once must not share them).
    Why: each CuPy allocation costs about as much Python time as the selection's work on the GPU."""
    import cupy as cp
    key = (cp.cuda.Device().id, D)
    if key not in _cuda_scratch:
        _cuda_scratch[key] = (cp.empty(D, dtype=cp.int64), cp.empty(D, dtype=cp.float32))
    return _cuda_scratch[key]


def topk_rows_matvec_cuda(x, k, Wt, rows_per_block=0, unroll=8):
    """For one token x (D,) on the GPU: y = vals @ Wt[idx] with idx = topk_nonzero(x, k), vals = x[idx],
    all on the device (no host sync). Returns y (O,) and n, a 0-d device int32: how many rows were read.
    x float32, Wt float32 (D, O), D <= CUDA_MAX_D."""
    import cupy as cp
    D, O = x.shape[0], Wt.shape[1]
    if D != Wt.shape[0] or D > CUDA_MAX_D:
        raise ValueError(f"x has {D} entries; the kernel needs Wt's {Wt.shape[0]} rows and at most {CUDA_MAX_D}")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    idx, vals = _select_buffers(D)
    n = cp.empty((), dtype=cp.int32)                   # returned: not shared between calls
    y = cp.empty(O, dtype=cp.float32)                  # zeroed by topk_select
    per_thread = next(p for p in (1, 2, 4, 8, 16) if 1024 * p >= D)
    _cuda_kernel("topk_select", unroll, per_thread)(
        (1,), (1024,), (x, np.int32(D), np.int32(k), idx, vals, n, y, np.int32(O)))
    return _cuda_rows(vals, idx, n, min(max(k, 0), D), Wt, y, rows_per_block, unroll, per_thread), n


def topk_rows_matvec(x, k, Wt, method="auto"):
    """rowsparse.sparse_rows_matvec for top-K by `method`: one token x (D,), y = xs @ Wt reading only the rows
    where xs = topk_forward(x, k) is nonzero. Returns y (O,) and how many rows were read (an int;
    on the GPU a 0-d device array, not synchronized). The CPU selects with fast.topk.topk_nonzero;
    the GPU selects and multiplies on the device."""
    xp = array_module(Wt)
    if xp is not np and Wt.dtype == xp.float32 and x.dtype == xp.float32 and x.shape[0] <= CUDA_MAX_D:
        return topk_rows_matvec_cuda(x, k, Wt)
    idx = topk_nonzero(x, k)
    return rows_matvec(x[idx], idx, Wt, method), idx.shape[0]


def nm_rows_matvec(x, keep, block, Wt, method="auto"):
    """rowsparse.sparse_rows_matvec for N:M by `method`: at most `keep` rows of every `block` are read. On the GPU
    the selection's nonzero() waits for the device (no N:M selection kernel yet)."""
    idx = topk_nonzero(x, keep, block)
    return rows_matvec(x[idx], idx, Wt, method), idx.shape[0]


def quiet_blas(method="auto"):
    """A context in which BLAS uses one thread while the numba kernel decodes (else it does nothing).

    Why: after each call OpenBLAS's worker threads spin-wait for the next one. Decoding
    alternates small BLAS products (attention, the LM head) with the numba kernel, whose own
    threads then share the cores with the spinning ones (benchmarks/RESULTS.md).
    Needs threadpoolctl (requirements.txt); without it, nothing changes."""
    resolved = best_method() if method == "auto" else method
    limit = blas_threads(1) if resolved == "numba" else None
    return contextlib.nullcontext() if limit is None else limit


def best_method():
    """The fastest row-sparse method on the CPU: 'numba' where it is installed, else 'chunked'."""
    return "numba" if numba is not None else "chunked"


AUTO_MIN_WEIGHTS = 2 ** 17       # the fewest weights (D x sum O_i) at which numba's kernel pays
AUTO_MAX_ROWS = {"cpu": 8, "gpu": 4}   # the most tokens per call at which a row-sparse product pays


def auto_method(xp, n_weights, min_weights=AUTO_MIN_WEIGHTS, rows=1):
    """What `--kernel auto` decodes a projection of n_weights = D x sum O_i weights with, for calls
    of `rows` tokens: a method of METHODS, or None for the masked dense product. This is the one
    statement of the policy; it follows the measurements in benchmarks/RESULTS.md:
      - calls of more than auto_max_rows(xp) tokens (a prefill, a large batch): None. The union
        of the rows B tokens select approaches all of them as B grows (benchmarks/batch_union.py),
        and the dense product of the masked input is then as fast (benchmarks/batch_decode.py);
      - on the GPU, the CUDA kernels, for every projection;
      - on the CPU with numba, its kernel for projections of at least `min_weights` weights; below
        that, the kernel's fixed cost per call is about what it saves;
      - on the CPU without numba, None everywhere: NumPy's row gathers ('chunked') are slower than
        the masked product at every size measured."""
    if rows > auto_max_rows(xp):
        return None
    if xp is not np:
        return "auto"
    if numba is None or n_weights < min_weights:
        return None
    return "numba"


def auto_max_rows(xp):
    """The most tokens one call may have for auto_method to take a row-sparse product."""
    return AUTO_MAX_ROWS["cpu" if xp is np else "gpu"]


def rows_matvec(vals, idx, Wt, method="auto"):
    """rowsparse.rows_matvec by `method` (one of METHODS); CuPy arrays always take the GPU kernel."""
    xp = array_module(Wt)
    if xp is not np:
        if Wt.dtype != xp.float32:
            return vals @ Wt[idx]          # the kernel is float32; float64 (tests) takes the reference
        return rows_matvec_cuda(vals, idx, Wt)
    if method == "auto":
        method = best_method()
    if method == "gather":
        return rows_matvec_gather(vals, idx, Wt)
    if method == "chunked":
        return rows_matvec_chunked(vals, idx, Wt)
    if method == "numba":
        return rows_matvec_numba(vals, idx, Wt)
    raise ValueError(f"method {method!r} is not one of {METHODS}")
