"""Sparse decoding: a projection that reads only the weight rows its input selected (Q-Sparse's saving).

For one token, top-K keeps K of the D inputs: xs has nonzeros only at the indices idx.
Stored input-major, Wt = W^T: (D, O), so the product needs only K rows of Wt:

    y = xs @ Wt = sum_{k < K}  xs[idx[k]] * Wt[idx[k], :]            y: (O,)

It reads K*O of the D*O weights and does K*O of the multiply-adds: the ideal speedup over
the dense product is D / K = 1 / (1 - S). At batch 1 decoding is limited by reading the
weights from memory, so the bytes are what count.

Three implementations, all equal up to float32 rounding (tests/test_rowsparse.py):
  "gather":  vals @ Wt[idx]. The readable reference. NumPy copies the K selected rows to a
             new (K, O) array, then BLAS reads that copy again: twice the traffic plus an
             allocation, so it is slower than dense until S is large.
  "chunked": the same sum, gathered `chunk` rows at a time into one reused buffer small enough
             to stay in cache, so main memory is read once; pure NumPy.
  "numba":   a compiled kernel that reads each selected row once, with no copy, threads
             splitting the outputs; used when numba is installed (it is optional).
On CuPy arrays a RawKernel does the same on the GPU (`_cuda_rows_matvec`).
"""

import numpy as np

from .backend import array_module, blas_threads

try:                                   # optional: pip install numba
    import numba
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None

METHODS = ("gather", "chunked", "numba", "auto")


def input_major(weights):
    """[W_i (O_i, D)] -> Wt (D, sum O_i), C-contiguous: row d holds every output's weight for input d."""
    xp = array_module(weights[0])
    return xp.ascontiguousarray(xp.concatenate([W.T for W in weights], axis=1))


def rows_matvec_gather(vals, idx, Wt):
    """The reference: y = vals @ Wt[idx].  vals, idx: (K,); Wt: (D, O) -> y: (O,)."""
    return vals @ Wt[idx]


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
    @numba.njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
    def _numba_rows_matvec(vals, idx, Wt, y, tile):
        # Threads take separate tiles of the outputs (no reduction between threads). In a
        # tile, 4 selected rows are added per pass: the partial sum y[j0:j1] (8 KB) is read
        # and written once per 4 rows instead of once per row, and stays in L1; each row
        # segment is read once, contiguously. fastmath lets LLVM vectorize the inner loop.
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
        return y


def rows_matvec_numba(vals, idx, Wt, tile=2048):
    """The compiled kernel: reads each of the K selected rows once. Needs numba."""
    if numba is None:
        raise RuntimeError("the 'numba' method needs numba: pip install numba")
    O, P = Wt.shape[1], numba.get_num_threads()
    # a multiple of the thread count of equal tiles, each at most `tile` wide, so every
    # thread gets the same share (3 tiles on 2 threads would leave one idle a third of the time)
    n_tiles = P * -(-O // (P * tile))
    tile = max(16, -(-O // n_tiles))
    y = np.empty(O, dtype=Wt.dtype)
    return _numba_rows_matvec(vals.astype(Wt.dtype, copy=False), idx, Wt, y, tile)


# one thread per 4 outputs (a float4 load), one block per (1024 outputs, 32 selected rows: the
# fastest of 8..256 on an H200 at D = 4096, benchmarks/decode_speed.py);
# the blocks of a column add their partial sums with atomicAdd. Reads only the selected rows.
_CUDA_SRC = r"""
extern "C" __global__ void rows_matvec(const float* __restrict__ vals, const long long* __restrict__ idx,
                                       const float* __restrict__ Wt, float* __restrict__ y,
                                       int K, int O, int rows_per_block) {
    int j = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    int k0 = blockIdx.y * rows_per_block;
    int k1 = min(K, k0 + rows_per_block);
    if (j >= O) return;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    if (j + 3 < O && (O % 4) == 0) {
        for (int k = k0; k < k1; ++k) {
            float v = vals[k];
            float4 w = *reinterpret_cast<const float4*>(Wt + idx[k] * (long long)O + j);
            a0 += v * w.x; a1 += v * w.y; a2 += v * w.z; a3 += v * w.w;
        }
        atomicAdd(y + j, a0); atomicAdd(y + j + 1, a1); atomicAdd(y + j + 2, a2); atomicAdd(y + j + 3, a3);
    } else {
        for (int t = 0; t < 4 && j + t < O; ++t) {
            float a = 0.f;
            for (int k = k0; k < k1; ++k) a += vals[k] * Wt[idx[k] * (long long)O + j + t];
            atomicAdd(y + j + t, a);
        }
    }
}
"""
_cuda_kernel = None


def rows_matvec_cuda(vals, idx, Wt, rows_per_block=32):
    """The GPU kernel (CuPy, float32): y = vals @ Wt[idx] without copying the rows."""
    global _cuda_kernel
    import cupy as cp
    if _cuda_kernel is None:
        _cuda_kernel = cp.RawKernel(_CUDA_SRC, "rows_matvec")
    K, O = idx.shape[0], Wt.shape[1]
    y = cp.zeros(O, dtype=cp.float32)
    threads = 256
    grid = ((O + 4 * threads - 1) // (4 * threads), max(1, (K + rows_per_block - 1) // rows_per_block))
    _cuda_kernel(grid, (threads,), (vals.astype(cp.float32, copy=False), idx.astype(cp.int64, copy=False),
                                    Wt, y, np.int32(K), np.int32(O), np.int32(rows_per_block)))
    return y


def quiet_blas(method="auto"):
    """A context in which BLAS uses one thread, while the numba kernel decodes (else it does nothing).

    Why: after each call OpenBLAS's worker threads spin-wait for the next one. Decoding
    alternates small BLAS products (attention, the LM head) with the numba kernel, whose own
    threads then share the 2 cores with the spinning ones. Measured on a 2-core Xeon, n_embd
    2048: row-sparse decode at 50% ran 70 tokens/s with BLAS's 2 threads and 100 with one.
    Needs threadpoolctl (requirements.txt); without it, nothing changes."""
    import contextlib
    resolved = best_method() if method == "auto" else method
    limit = blas_threads(1) if resolved == "numba" else None
    return contextlib.nullcontext() if limit is None else limit


def best_method():
    """'numba' where it is installed (fastest here), else 'chunked'."""
    return "numba" if numba is not None else "chunked"


def rows_matvec(vals, idx, Wt, method="auto"):
    """y = vals @ Wt[idx] by `method` (one of METHODS); CuPy arrays always take the GPU kernel."""
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
