"""Packed ternary weights (minisparse/ternary.py) and the compiled 2-bit kernel (fast/ternary.py):
the packing against its definition, the integer sums against codes multiplied directly, the
packed product against the float 1.58-bit projection, and the kernel against the reference
exactly."""

import numpy as np
import pytest

from minisparse import quant, rowsparse, ternary
from minisparse.fast import ternary as fast_ternary
from minisparse.linear import SparseSpec, quantized_weights

HAVE_NUMBA = fast_ternary.numba is not None


@pytest.mark.parametrize("O", [4, 12, 13, 15, 64])
def test_pack_is_its_definition_and_unpack_inverts_it(O):
    rng = np.random.default_rng(O)
    C = rng.integers(-1, 2, size=(5, O)).astype(np.int8)
    P = ternary.pack_codes(C)
    Q = -(-O // 4)
    assert P.dtype == np.uint8 and P.shape == (5, Q)
    u = np.ones((5, 4 * Q), dtype=int)                          # padding columns hold code 0 (u = 1)
    u[:, :O] = C + 1
    for d in range(5):
        for j in range(Q):
            assert int(P[d, j]) == sum(int(u[d, i * Q + j]) << (2 * i) for i in range(4)), (d, j)
    np.testing.assert_array_equal(ternary.unpack_codes(P, O), C)


def test_pack_weights_keeps_each_weights_codes_and_scale():
    rng = np.random.default_rng(1)
    Ws = [rng.standard_normal((6, 16)) * 0.02, rng.standard_normal((3, 16)) * 0.5]
    tw = ternary.pack_weights(Ws)
    assert tw.sizes == [6, 3] and tw.O == 9
    codes = np.concatenate([quant.quantize_weights(W)[0].T for W in Ws], axis=1)      # (16, 9)
    np.testing.assert_array_equal(ternary.unpack_codes(tw.packed, 9), codes)
    want = np.concatenate([np.full(W.shape[0], 1.0 / quant.quantize_weights(W)[1]) for W in Ws])
    np.testing.assert_allclose(tw.col_scale, want, rtol=1e-7)


def case(D=64, Os=(40, 24), K=20, seed=0):
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal((O, D)).astype(np.float32) * 0.05 for O in Os]
    tw = ternary.pack_weights(Ws)
    idx = np.sort(rng.choice(D, K, replace=False))
    qv = rng.integers(-127, 128, size=K)
    return Ws, tw, idx, qv


def test_integer_sums_equal_the_codes_multiplied_directly():
    Ws, tw, idx, qv = case()
    C = np.concatenate([quant.quantize_weights(W)[0].T for W in Ws], axis=1).astype(np.int64)   # (D, O)
    want = (qv[:, None] * C[idx]).sum(axis=0)
    got = ternary.ternary_rows_matvec(qv, idx, tw.packed, tw.O)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", [SparseSpec(0.5, a_bits=8, w_bits=1.58), SparseSpec(0.0, a_bits=8, w_bits=1.58),
                                  SparseSpec(0.0, nm=(2, 4), a_bits=8, w_bits=1.58), SparseSpec(0.75, a_bits=8, w_bits=1.58)],
                         ids=str)
def test_packed_product_equals_the_float_158_bit_projection(spec):
    """From the packed bytes, the same y as the float path (dequantized weights, rowsparse.py's
    reference) to float32 rounding, reading the same rows."""
    Ws, tw, _, _ = case(D=64, Os=(40, 24), seed=2)
    x = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    x[::9] = 0.0
    y, read = ternary.ternary_sparse_matvec(x, spec, tw)
    want, want_read = rowsparse.sparse_rows_matvec(x, spec, rowsparse.input_major(quantized_weights(Ws, spec)))
    assert read == want_read
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("D,Os,K", [(64, (40, 24), 20), (256, (256, 768), 128), (256, (13,), 256), (32, (8,), 0),
                                    (2048, (6144,), 1024)])
def test_kernel_equals_the_reference_exactly(D, Os, K):
    Ws, tw, idx, qv = case(D, Os, K, seed=D + K)
    want = ternary.ternary_rows_matvec(qv, idx, tw.packed, tw.O)
    for parts in (1, 2, 3):                          # one share of the rows, or several
        got = fast_ternary.ternary_rows_matvec(qv, idx, tw.packed, tw.O, parts=parts)
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    spec = SparseSpec(0.5, a_bits=8, w_bits=1.58)
    a = ternary.ternary_sparse_matvec(x, spec, tw)
    b = ternary.ternary_sparse_matvec(x, spec, tw, rows_matvec=fast_ternary.ternary_rows_matvec)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("v", [127, -128, 1])
def test_kernel_int16_blocks_hold_the_largest_sums(v):
    """Every weight +1 (u = 2, the largest stored code) and every code at its extreme: each block of
    fast.ternary.BLOCK_ROWS rows must sum in int16 without wrapping. K = 1000 is no multiple of the
    block or of the four rows a pass."""
    D, O = 1000, 36
    packed = ternary.pack_codes(np.ones((D, O), dtype=np.int8))
    qv, idx = np.full(D, v), np.arange(D)
    got = fast_ternary.ternary_rows_matvec(qv, idx, packed, O)
    np.testing.assert_array_equal(got, np.full(O, v * D))
    assert fast_ternary.BLOCK_ROWS * 128 * 2 < 2 ** 15


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", [SparseSpec(0.0, a_bits=8, w_bits=1.58), SparseSpec(0.5, a_bits=8, w_bits=1.58),
                                  SparseSpec(0.9, a_bits=8, w_bits=1.58), SparseSpec(0.0, nm=(2, 4), a_bits=8, w_bits=1.58),
                                  SparseSpec(0.0, nm=(16, 32), a_bits=8, w_bits=1.58)], ids=str)
def test_fused_token_equals_the_reference_bit_for_bit(spec, dtype):
    """fast.ternary.ternary_sparse_matvec (selection, quantization and kernel) against
    ternary.ternary_sparse_matvec: the same y to the bit and the same rows read, with exact zeros
    (not read), entries that quantize to zero (not read) and a tie at the threshold."""
    Ws, tw, _, _ = case(D=512, Os=(96, 32, 33), seed=5)
    rng = np.random.default_rng(6)
    for trial in range(4):
        x = rng.standard_normal(512).astype(dtype)
        x[::5] = 0.0                                   # zeros, as ReLU2 makes
        x[1::17] *= 1e-4                               # kept by top-K at low S, quantized to code 0
        x[3], x[4] = x[7], -x[7]                       # a tie
        if trial == 3:
            x[:] = 0.0                                 # nothing to read
        want, want_read = ternary.ternary_sparse_matvec(x, spec, tw)
        got, read = fast_ternary.ternary_sparse_matvec(x, spec, tw)
        assert read == want_read
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def exact_halves(dtype):
    """x (D,) whose largest |x| is a power of two gamma so large that gamma + eps rounds to gamma
    (2**10 in float32, 2**43 in float64), so that 127 / (gamma + eps) = 127 / gamma exactly, and
    some of whose entries then scale to exact halves (2.5, 3.5, -2.5): round-half-to-even and
    round-half-up disagree on them."""
    gamma = 2.0 ** (10 if dtype == np.float32 else 43)
    scale = dtype(127.0) / (dtype(gamma) + dtype(quant.EPS))
    assert scale == dtype(127.0 / gamma)
    x = np.zeros(64, dtype=dtype)
    x[0] = gamma
    for i, half in zip((5, 9, 13), (2.5, 3.5, -2.5)):
        c = dtype(half * gamma / 127.0)
        while c * scale != half:                     # the float next to half * 1024 / 127 that lands on it
            c = np.nextafter(c, dtype(np.inf) if c * scale < half else dtype(-np.inf))
        x[i] = c
    assert np.count_nonzero((x * scale) % 1 == 0.5) == 3
    return x


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_token_rounds_halves_to_even_like_the_reference(dtype):
    x = exact_halves(dtype)
    _, tw, _, _ = case(D=64, Os=(40,), seed=8)
    spec = SparseSpec(0.0, a_bits=8, w_bits=1.58)
    want, want_read = ternary.ternary_sparse_matvec(x, spec, tw)
    got, read = fast_ternary.ternary_sparse_matvec(x, spec, tw)
    assert read == want_read == 4                    # 127, and 2.5 -> 2, 3.5 -> 4, -2.5 -> -2
    np.testing.assert_array_equal(got, want)
