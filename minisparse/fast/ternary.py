"""The compiled 2-bit decode: ternary.py's functions with numba, equal to them exactly
(tests/test_ternary.py).

    fast.ternary.ternary_rows_matvec(qv, idx, packed, O)  ==  ternary.ternary_rows_matvec(qv, idx, packed, O)
    fast.ternary.ternary_sparse_matvec(x, spec, tw)       ==  ternary.ternary_sparse_matvec(x, spec, tw)

Both give the same integer sums; ternary_sparse_matvec also gives the same y bit for bit, since
it quantizes x and scales the sums with the same float operations in the same order, unfused.

Why faster: the products v * u (|v| <= 128, u = c + 1 in {0, 1, 2}) and their sums over a block
of 120 rows fit in int16, so the kernel adds them in int16 lanes, twice as many a vector as
int32, and moves each block's sums into int32 accumulators. numba widens every integer
operation to int64, so the two int16 operations are written as LLVM intrinsics (`_field`,
`_mac`); LLVM then vectorizes the loop over a row's bytes into 16-bit shifts, masks,
multiplies and adds. Each byte holds four columns, one from each quarter of the row
(ternary.py's layout), so each quarter has its own contiguous accumulator. Four rows are added
per pass over the accumulators. Each thread takes an equal share of the selected rows and reads
them whole, one contiguous stream, into its own partial sums, which are added at the end.
ternary_sparse_matvec also selects (fast/step.py's selection, which keeps what
fast.topk.topk_nonzero keeps) and quantizes only the kept entries inside the same compiled call,
so a token costs one call. Needs numba.
"""

import numpy as np

from ..nm import check_nm
from ..quant import EPS
from .jit import call, kernel, njit

try:                                   # optional: pip install numba
    import numba
    from numba import types
    from numba.extending import intrinsic

    from .step import _select, kept_per_block
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None

BLOCK_ROWS = 120       # rows summed in int16 before moving to int32: 120 * 128 * 2 < 2**15

if numba is not None:
    @intrinsic
    def _field(typingctx, b, shift):
        """(b >> shift) & 3 of a byte, as int16."""
        def codegen(context, builder, signature, args):
            w = builder.zext(args[0], context.get_value_type(types.int16))
            return builder.and_(builder.lshr(w, args[1]), context.get_constant(types.int16, 3))
        return types.int16(types.uint8, types.int16), codegen

    @intrinsic
    def _mac(typingctx, acc, v, u):
        """acc + v * u in int16 (wrapping; BLOCK_ROWS keeps it from wrapping)."""
        def codegen(context, builder, signature, args):
            return builder.add(args[0], builder.mul(args[1], args[2]))
        return types.int16(types.int16, types.int16, types.int16), codegen

    S0, S1, S2, S3 = np.int16(0), np.int16(2), np.int16(4), np.int16(6)

    @njit()
    def _rows_into(qv, idx, packed, A, k0, k1):
        """A (4, Q) int32 += sum_{k0 <= k < k1} qv[k] * U[idx[k]], U the stored codes u = c + 1,
        quarter i of the row in A[i]; whole rows, four a pass, int16 sums for each block of rows."""
        Q = packed.shape[1]
        a0, a1 = np.zeros(Q, dtype=np.int16), np.zeros(Q, dtype=np.int16)     # one block's sums
        a2, a3 = np.zeros(Q, dtype=np.int16), np.zeros(Q, dtype=np.int16)
        k = k0
        while k < k1:
            kend = min(k1, k + BLOCK_ROWS)
            while k + 4 <= kend:                       # four rows a pass over the accumulators
                v0, v1, v2, v3 = qv[k], qv[k + 1], qv[k + 2], qv[k + 3]
                r0, r1, r2, r3 = packed[idx[k]], packed[idx[k + 1]], packed[idx[k + 2]], packed[idx[k + 3]]
                for j in range(Q):
                    b0, b1, b2, b3 = r0[j], r1[j], r2[j], r3[j]
                    a0[j] = _mac(_mac(_mac(_mac(a0[j], v0, _field(b0, S0)), v1, _field(b1, S0)),
                                      v2, _field(b2, S0)), v3, _field(b3, S0))
                    a1[j] = _mac(_mac(_mac(_mac(a1[j], v0, _field(b0, S1)), v1, _field(b1, S1)),
                                      v2, _field(b2, S1)), v3, _field(b3, S1))
                    a2[j] = _mac(_mac(_mac(_mac(a2[j], v0, _field(b0, S2)), v1, _field(b1, S2)),
                                      v2, _field(b2, S2)), v3, _field(b3, S2))
                    a3[j] = _mac(_mac(_mac(_mac(a3[j], v0, _field(b0, S3)), v1, _field(b1, S3)),
                                      v2, _field(b2, S3)), v3, _field(b3, S3))
                k += 4
            while k < kend:
                v = qv[k]
                row = packed[idx[k]]
                for j in range(Q):
                    b = row[j]
                    a0[j] = _mac(a0[j], v, _field(b, S0))
                    a1[j] = _mac(a1[j], v, _field(b, S1))
                    a2[j] = _mac(a2[j], v, _field(b, S2))
                    a3[j] = _mac(a3[j], v, _field(b, S3))
                k += 1
            for j in range(Q):                         # the block's sums into int32
                A[0, j] += a0[j]
                A[1, j] += a1[j]
                A[2, j] += a2[j]
                A[3, j] += a3[j]
                a0[j] = 0
                a1[j] = 0
                a2[j] = 0
                a3[j] = 0

    @njit(parallel=True)
    def _ternary_rows(qv, idx, packed, acc, P):
        """acc (4 Q,) int32 = sum_k qv[k] * C[idx[k], :], for qv (K,) int16 codes; P parts of the
        rows, one a thread, each summed whole rows at a time into its own partial sums."""
        Q = packed.shape[1]
        K = idx.shape[0]
        total = 0
        for k in range(K):
            total += qv[k]
        parts = np.zeros((P, 4, Q), dtype=np.int32)
        for p in numba.prange(P):
            _rows_into(qv, idx, packed, parts[p], K * p // P, K * (p + 1) // P)
        flat = parts.reshape(P, 4 * Q)
        for j in range(4 * Q):                         # u = c + 1: subtract sum_k qv[k] once
            acc[j] = flat[0, j] - total
        for p in range(1, P):                          # the other partial sums, one pass each
            for j in range(4 * Q):
                acc[j] += flat[p, j]

    @njit()
    def _quantize_kept(x, idx, c127, eps):
        """quant.quantize_activations of the kept entries x[idx] (the others are zeros, which change
        neither gamma nor their own code 0): the nonzero codes (int16), their rows, and the scale.
        The same float operations as quant.py, in x's dtype (no fastmath: the same roundings)."""
        gamma = x.dtype.type(0)
        for i in idx:
            gamma = max(gamma, abs(x[i]))
        scale = c127 / (gamma + eps)
        codes = np.empty(idx.shape[0], dtype=np.int16)
        rows = np.empty(idx.shape[0], dtype=np.int64)
        K = 0
        for i in idx:
            q = min(max(np.rint(x[i] * scale), -128.0), 127.0)
            if q != 0:
                codes[K] = np.int16(q)
                rows[K] = i
                K += 1
        return codes[:K], rows[:K], scale

    @njit()
    def _token(x, k, block, c127, eps, packed, col_scale, y, P, rows_kernel):
        """One token: the kept inputs (fast.step's selection, fast.topk.topk_nonzero's rule), their
        INT8 codes, the integer sums, and y = sums * (col_scale / scale) as ternary.py computes it
        (the same operations in the same types: y's dtype is the two scales' result type); returns
        the rows read. rows_kernel: _ternary_rows as a kernel (_rows_kernel), passed in rather than
        named so that this function holds no threaded code and stays cached (fast/jit.py)."""
        idx = np.empty(x.shape[0], dtype=np.int64)
        vals = np.empty_like(x)
        n = _select(x, k, block, idx, vals)
        codes, rows, scale = _quantize_kept(x, idx[:n], c127, eps)
        acc = np.empty(4 * packed.shape[1], dtype=np.int32)
        call(rows_kernel, codes, rows, packed, acc, P)
        cast = col_scale.dtype.type                     # acc.astype(col_scale.dtype)
        for j in range(y.shape[0]):
            y[j] = cast(acc[j]) * (col_scale[j] / scale)
        return rows.shape[0]


_rows_kernels = {}


def _rows_kernel(packed):
    """_ternary_rows as the kernel _token runs (fast/jit.py): int16 codes and int64 rows as _token
    makes them, for `packed`'s type; compiled in this process on first use."""
    key = (packed.dtype, packed.flags.c_contiguous, packed.flags.f_contiguous, packed.flags.writeable,
           packed.flags.aligned)                        # what numba's type of packed depends on, cheaply
    if key not in _rows_kernels:
        _rows_kernels[key] = kernel(_ternary_rows, types.int16[::1], types.int64[::1], numba.typeof(packed),
                                    types.int32[::1], types.int64)
    return _rows_kernels[key]


def ternary_rows_matvec(qv, idx, packed, O, parts=0):
    """acc (O,) int32 = sum_k qv[k] * C[idx[k], :], reading each selected row of `packed` once.
    qv: integer codes in [-128, 127]. parts: how many shares of the rows the threads take (0: one
    for each of numba's threads)."""
    if numba is None:
        raise RuntimeError("the compiled ternary kernel needs numba: pip install numba")
    acc = np.empty(4 * packed.shape[1], dtype=np.int32)
    _ternary_rows(np.ascontiguousarray(qv, dtype=np.int16), np.ascontiguousarray(idx, dtype=np.int64),
                  packed, acc, parts or numba.get_num_threads())
    return acc[:O]


def ternary_sparse_matvec(x, spec, tw, rows_matvec=None):
    """One token x (D,) of a 1.58-bit model: y (O,) and the rows read, as
    ternary.ternary_sparse_matvec(x, spec, tw). rows_matvec is accepted for the same signature
    and ignored: this function always runs the compiled kernel."""
    if numba is None:
        raise RuntimeError("the compiled ternary kernel needs numba: pip install numba")
    D = x.shape[0]
    k, block = kept_per_block(spec, D)
    if spec.nm is not None:
        check_nm(k, block, D)
    dtype = x.dtype.type
    y = np.empty(tw.O, dtype=np.result_type(tw.col_scale.dtype, x.dtype))
    read = _token(np.ascontiguousarray(x), k, block, dtype(127.0), dtype(EPS), tw.packed, tw.col_scale, y,
                  numba.get_num_threads(), _rows_kernel(tw.packed))
    return y, int(read)
