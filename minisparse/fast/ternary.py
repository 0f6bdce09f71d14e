"""The compiled 2-bit kernel: ternary.ternary_rows_matvec with numba, equal to it exactly (integer
sums; tests/test_ternary.py).

    fast.ternary.ternary_rows_matvec(qv, idx, packed, O)  ==  ternary.ternary_rows_matvec(qv, idx, packed, O)

Why faster: the reference unpacks the K selected rows into a (K, O) int32 array and multiplies;
this kernel reads each selected row's bytes once and adds v * u into four contiguous
accumulators, one per quarter of the row (ternary.py's layout), so the inner loop over a row's
bytes is shift, mask, multiply, add on contiguous arrays: LLVM vectorizes it. Four rows are
added per pass, so the accumulators (a tile of them stays in L1) are read and written once per
four rows instead of once per row. The stored u = c + 1
saves the subtraction per weight; sum_k qv[k] is subtracted once per column at the end.
Threads take separate tiles of the bytes. Needs numba.
"""

import numpy as np

try:                                   # optional: pip install numba
    import numba
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None

if numba is not None:
    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _ternary_rows(qv, idx, packed, acc, tile):
        Q = packed.shape[1]
        K = idx.shape[0]
        total = 0
        for k in range(K):
            total += qv[k]
        for t in numba.prange((Q + tile - 1) // tile):
            j0 = t * tile
            j1 = min(Q, j0 + tile)
            n = j1 - j0
            a0 = np.zeros(n, dtype=np.int32)
            a1 = np.zeros(n, dtype=np.int32)
            a2 = np.zeros(n, dtype=np.int32)
            a3 = np.zeros(n, dtype=np.int32)
            k = 0
            while k + 4 <= K:              # four rows a pass: the accumulators are read and written
                v0, v1, v2, v3 = qv[k], qv[k + 1], qv[k + 2], qv[k + 3]     # once per four rows
                r0, r1 = packed[idx[k], j0:j1], packed[idx[k + 1], j0:j1]
                r2, r3 = packed[idx[k + 2], j0:j1], packed[idx[k + 3], j0:j1]
                for j in range(n):
                    b0, b1, b2, b3 = np.int32(r0[j]), np.int32(r1[j]), np.int32(r2[j]), np.int32(r3[j])
                    a0[j] += v0 * (b0 & 3) + v1 * (b1 & 3) + v2 * (b2 & 3) + v3 * (b3 & 3)
                    a1[j] += v0 * ((b0 >> 2) & 3) + v1 * ((b1 >> 2) & 3) + v2 * ((b2 >> 2) & 3) + v3 * ((b3 >> 2) & 3)
                    a2[j] += v0 * ((b0 >> 4) & 3) + v1 * ((b1 >> 4) & 3) + v2 * ((b2 >> 4) & 3) + v3 * ((b3 >> 4) & 3)
                    a3[j] += v0 * (b0 >> 6) + v1 * (b1 >> 6) + v2 * (b2 >> 6) + v3 * (b3 >> 6)
                k += 4
            while k < K:
                v = qv[k]
                row = packed[idx[k], j0:j1]
                for j in range(n):
                    b = np.int32(row[j])
                    a0[j] += v * (b & 3)
                    a1[j] += v * ((b >> 2) & 3)
                    a2[j] += v * ((b >> 4) & 3)
                    a3[j] += v * (b >> 6)
                k += 1
            for j in range(n):
                acc[j0 + j] = a0[j] - total
                acc[Q + j0 + j] = a1[j] - total
                acc[2 * Q + j0 + j] = a2[j] - total
                acc[3 * Q + j0 + j] = a3[j] - total
        return acc


def ternary_rows_matvec(qv, idx, packed, O, tile=1024):
    """acc (O,) int32 = sum_k qv[k] * C[idx[k], :], reading each selected row of `packed` once."""
    if numba is None:
        raise RuntimeError("the compiled ternary kernel needs numba: pip install numba")
    Q = packed.shape[1]
    acc = np.empty(4 * Q, dtype=np.int32)
    _ternary_rows(np.ascontiguousarray(qv, dtype=np.int32), np.ascontiguousarray(idx, dtype=np.int64),
                  packed, acc, tile)
    return acc[:O]
