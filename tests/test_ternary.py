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
    for tile in (16, 1024):
        got = fast_ternary.ternary_rows_matvec(qv, idx, tw.packed, tw.O, tile=tile)
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    spec = SparseSpec(0.5, a_bits=8, w_bits=1.58)
    a = ternary.ternary_sparse_matvec(x, spec, tw)
    b = ternary.ternary_sparse_matvec(x, spec, tw, rows_matvec=fast_ternary.ternary_rows_matvec)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
